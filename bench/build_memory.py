"""Peak memory of `l4compile build --weights CHECKPOINT` on a checkpoint larger than 2 GB.

Weights are memory-mapped and streamed one tensor at a time into the ONNX external-data file,
so the build's peak RSS should be about the largest tensor plus the compiler's fixed overhead,
not the size of the model. This script writes a synthetic bf16 Hugging Face checkpoint tensor by
tensor (the generator itself stays small), runs the build in a fresh subprocess per build dtype,
and reports that subprocess's peak RSS (ru_maxrss) against the largest tensor, with a
`build --dry-run` of the same spec (no weights) as the fixed overhead.

    python bench/build_memory.py [--layers 8] [--dtype bfloat16 --dtype float32] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import ml_dtypes
import numpy as np

from l4compile.hf import hf_config_from_spec
from l4compile.hf.safetensors_io import TensorPlan, write_safetensors
from l4compile.lower import lower
from l4compile.spec import dump_spec_yaml, load_spec
from l4compile.weights.hf_mapping import hf_name_of

ROOT = Path(__file__).resolve().parents[1]
BF16 = np.dtype(ml_dtypes.bfloat16)
CHUNK_ELEMENTS = 8 * 2**20


def bench_spec(layers: int):
    """tiny-maverick's structure at hidden 2048, vocab 131072, 16 experts: ~2.3 GB in bf16 at 8 layers."""
    spec = load_spec(ROOT / "specs" / "tiny-maverick.yaml")
    att = replace(spec.attention, num_heads=16, num_kv_heads=4, head_dim=128, chunk_size=8192,
                  temperature_tuning=replace(spec.attention.temperature_tuning, floor_scale=8192))
    return replace(spec, name="bench-build-memory", description="synthetic checkpoint for bench/build_memory.py",
                   hidden_size=2048, vocab_size=131072, num_layers=layers, dense_intermediate_size=4096,
                   attention=att, moe=replace(spec.moe, num_experts=16, intermediate_size=1024),
                   nope_layers=tuple(i for i in range(layers) if (i + 1) % 4 == 0),
                   moe_layers=tuple(range(1, layers, 2)), source=None)


def write_checkpoint(spec, directory: Path) -> tuple[int, int, int]:
    """config.json + model.safetensors of random bf16 tensors, generated chunk by chunk.
    Returns (bytes, tensors, largest tensor bytes)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(hf_config_from_spec(spec, "bfloat16"), indent=2))
    plans = []
    for param in lower(spec, "bfloat16", kv_cache=False).params():
        mapping = hf_name_of(param.name)
        shape = tuple(param.type.shape)
        plans.append(TensorPlan(mapping.hf_name, BF16, shape[::-1] if mapping.transpose else shape))
    rng = np.random.default_rng(0)

    def produce(plan: TensorPlan):
        count = int(np.prod(plan.shape))
        for start in range(0, count, CHUNK_ELEMENTS):
            n = min(CHUNK_ELEMENTS, count - start)
            yield (rng.standard_normal(n, dtype=np.float32) * 0.02).astype(BF16)
    size = write_safetensors(directory / "model.safetensors", plans, produce)
    return size, len(plans), max(plan.nbytes for plan in plans)


def run_measured(command: list[str]) -> tuple[int, float, str]:
    """Run a command; its own peak RSS in bytes (os.wait4 gives this child's rusage), seconds, output."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"command failed ({process.returncode}): {' '.join(command)}\n{output}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start, output


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dtype", action="append", choices=["bfloat16", "float16", "float32"],
                        help="build dtype (repeatable; default bfloat16 and float32)")
    parser.add_argument("--workdir", type=Path, help="where to write the checkpoint and builds (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and builds")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="l4compile-build-memory-", dir=args.workdir))
    try:
        spec = bench_spec(args.layers)
        spec_file = work / f"{spec.name}.yaml"
        spec_file.write_text(dump_spec_yaml(spec))
        started = time.perf_counter()
        size, tensors, largest = write_checkpoint(spec, work / "checkpoint")
        print(f"checkpoint: {gb(size)} bf16 safetensors, {tensors} tensors, largest {gb(largest)} "
              f"(hidden {spec.hidden_size}, vocab {spec.vocab_size}, {spec.num_layers} layers, "
              f"{spec.moe.num_experts} experts); written in {time.perf_counter() - started:.1f} s, "
              f"generator peak RSS {gb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}")
        cli = [sys.executable, "-m", "l4compile.cli", "build", str(spec_file)]
        overhead, _, _ = run_measured(cli + ["--dry-run"])
        print(f"fixed overhead (build --dry-run, no weights): peak RSS {gb(overhead)}")
        print(f"{'build dtype':<12}{'weights written':>17}{'largest tensor':>16}{'peak RSS':>11}"
              f"{'bound: largest + 1 GB':>23}{'time':>9}")
        for dtype in args.dtype or ["bfloat16", "float32"]:
            out = work / f"build-{dtype}"
            command = cli + ["--weights", str(work / "checkpoint"), "--dtype", dtype, "-o", str(out)]
            peak, seconds, _ = run_measured(command)
            written = (out / "model.onnx.data").stat().st_size
            built_largest = largest * np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype).itemsize // 2
            verdict = "ok" if peak < built_largest + 1e9 else "EXCEEDED"
            print(f"{dtype:<12}{gb(written):>17}{gb(built_largest):>16}{gb(peak):>11}"
                  f"{gb(built_largest + 1e9) + ' ' + verdict:>23}{seconds:>8.1f}s")
            print(f"  $ l4compile build {spec_file.name} --weights checkpoint --dtype {dtype} -o {out.name}")
            shutil.rmtree(out)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
