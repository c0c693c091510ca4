"""Accuracy and file size of quantization settings, on bench/vs_llamacpp.py's checkpoints and prompt.

For one spec whose checkpoint bench/vs_llamacpp.py has made (--work, default ~/.cache/l4compile-bench/vs):
builds each variant (a quantization tier plus pass settings: the lm_head's bits and block size, the
embedding table's bits, accuracy_level) into a temporary directory, runs it on vs_llamacpp.py's accuracy
prompt (128 token ids, seed 2) and compares its logits with our fp32 build's (`ours-fp32` under --work),
exactly as vs_llamacpp.py's accuracy step does (`logits_agreement`: cosine per position, top-1 agreement).
With --peer, llama.cpp's Q8_0 / Q4_0 files under --work are measured the same way. No timing.

    python bench/quant_accuracy.py --spec specs/bench-16e-8k.yaml [--peer] [--variants int4,int4-lm8-b32,...]

One model is in memory at a time (each build and each run in its own process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from llamacpp import cache_dir, file_bytes  # noqa: E402
from vs_llamacpp import ACCURACY_TOKENS, prompt_ids  # noqa: E402

# name -> (BuildOptions fields, attributes set on the quantization pass; None: its default)
VARIANTS: dict[str, tuple[dict, dict]] = {
    "int4": ({"quantize": "int4"}, {}),           # the default: table 8-bit blocks of 64, lm_head 4-bit blocks of 64
    "int4-lm4-b32": ({"quantize": "int4"}, {"lm_head_block_size": 32}),   # the default before the lm_head's 64
    "int4-tables4": ({"quantize": "int4", "lm_head_bits": 4, "embedding_bits": 4}, {}),   # before e225a37
    "int4-emb8-b32": ({"quantize": "int4"}, {"embedding_block_size": 32}),
    "int4-lm8-b32": ({"quantize": "int4", "lm_head_bits": 8, "embedding_bits": 4}, {"lm_head_block_size": 32}),
    "int4-lm8-b64": ({"quantize": "int4", "lm_head_bits": 8, "embedding_bits": 4}, {}),
    "int4-lm8-b128": ({"quantize": "int4", "lm_head_bits": 8, "embedding_bits": 4}, {"lm_head_block_size": 128}),
    "int4-tables8": ({"quantize": "int4", "lm_head_bits": 8}, {}),
    "int4-acc0": ({"quantize": "int4"}, {"accuracy_level": 0}),
    "int8": ({"quantize": "int8"}, {}),
    "int8-acc0": ({"quantize": "int8"}, {"accuracy_level": 0}),
    "int8-acc0-moe": ({"quantize": "int8"}, {"accuracy_level": 0, "only": "moe"}),
    "int8-acc0-matmul": ({"quantize": "int8"}, {"accuracy_level": 0, "only": "matmul"}),
    "int8-emb-rows": ({"quantize": "int8"}, {"embedding_rows": True}),
    "int8-emb-b16": ({"quantize": "int8"}, {"embedding_block_size": 16}),
    "int8-emb-b64": ({"quantize": "int8"}, {"embedding_block_size": 64}),
    "int8-emb-b128": ({"quantize": "int8"}, {"embedding_block_size": 128}),
    "int8-emb-float": ({"quantize": "int8", "quantize_embeddings": False}, {}),
    "int8-lm-float": ({"quantize": "int8", "quantize_lm_head": False}, {}),
    "int8-lm-b64": ({"quantize": "int8"}, {"lm_head_block_size": 64}),
}


def build_worker(job: dict) -> None:
    """Build one variant (runs in its own process): BuildOptions fields, then pass attributes patched in."""
    from l4compile.build import BuildOptions, build
    from l4compile.passes import quantize
    from l4compile.spec import load_spec
    from l4compile.hf import HFCheckpoint
    fields, patch = VARIANTS[job["variant"]]
    patch = dict(patch)
    only, embedding_rows = patch.pop("only", None), patch.pop("embedding_rows", False)
    original = quantize.quantization_passes

    def passes(*args, **kwargs):
        out = original(*args, **kwargs)
        for p in out:
            for key, value in patch.items():
                setattr(p, key, value)
            if embedding_rows:
                p._quantize_tables = quantize._quantize_embeddings
        return out

    quantize.quantization_passes = passes
    if only:     # accuracy_level on one kind of op only: the other kind keeps the tier's default (4)
        from l4compile.ir.graph import Graph
        op_kinds = {"moe": ("moe_experts_nbits", "moe_dispatch_nbits"), "matmul": ("matmul_nbits",)}[only]
        graph_op = Graph.op

        def op(self, op_name, inputs, **attrs):
            if "accuracy_level" in attrs and op_name not in op_kinds:
                attrs["accuracy_level"] = 4
            return graph_op(self, op_name, inputs, **attrs)
        Graph.op = op
    spec = load_spec(Path(job["spec"]))
    build(spec, Path(job["out"]), HFCheckpoint.for_spec(job["weights"], spec, "float32"),
          BuildOptions(**fields, int4_method="rtn", force=True))


def logits_worker(job: dict) -> None:
    """Logits [prompts, positions, vocab] of one model (in its own process) for each prompt, saved to job["out"]."""
    prompts = [np.asarray(p, dtype=np.int64) for p in job["prompts"]]
    if job["engine"] == "ours":
        from l4compile.runtime import Engine
        engine = Engine.load(Path(job["path"]), threads=2)
        logits = [engine.logits(p[None])[0] for p in prompts]
    else:
        from llamacpp import LlamaCpp, Model
        model = Model(LlamaCpp.ensure(), Path(job["path"]), 2, context=ACCURACY_TOKENS + 64)
        logits = [model.logits(p) for p in prompts]
    np.save(job["out"], np.stack(logits))
    sys.stdout.flush()
    os._exit(0)      # no teardown: llama.cpp's threads and ctypes objects need none


def logits(engine: str, path: Path, prompts: list[np.ndarray], out: Path) -> np.ndarray:
    job = {"engine": engine, "path": str(path), "prompts": [p.tolist() for p in prompts], "out": str(out)}
    subprocess.run([sys.executable, __file__, "--spec", "-", "--logits-worker", json.dumps(job)], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return np.load(out)


def measure(engine: str, path: Path, prompts: list[np.ndarray], tmp: Path, reference: np.ndarray) -> dict:
    """vs_llamacpp.py's accuracy numbers on the first prompt, and their means over all prompts."""
    from l4compile.quant.report import logits_agreement
    got = logits(engine, path, prompts, tmp / "logits.npy")
    first = logits_agreement(got[:1], reference[:1])
    each = [logits_agreement(got[i:i + 1], reference[i:i + 1]) for i in range(len(prompts))]
    return {**first, "bytes": file_bytes(path),
            "cosine_all": float(np.mean([e["cosine_mean"] for e in each])),
            "top1_all": float(np.mean([e["top1_agreement"] for e in each]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--variants", default="int4,int4-lm4-b32", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--peer", action="store_true", help="also measure llama.cpp's Q8_0 and Q4_0 files")
    parser.add_argument("--work", type=Path, default=cache_dir() / "vs")
    parser.add_argument("--prompts", type=int, default=1,
                        help="prompts (seeds 2, 3, ...; the first is vs_llamacpp.py's): more average out the chaos")
    parser.add_argument("--build-worker", help=argparse.SUPPRESS)
    parser.add_argument("--logits-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_worker:
        build_worker(json.loads(args.build_worker))
        return
    if args.logits_worker:
        logits_worker(json.loads(args.logits_worker))
        return
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    from l4compile.spec import load_spec
    spec = load_spec(args.spec)
    work = args.work / spec.name
    for needed in (work / "hf" / "config.json", work / "ours-fp32" / "manifest.json"):
        if not needed.exists():
            parser.error(f"{needed} is missing: `python bench/vs_llamacpp.py --specs {args.spec} --work {args.work}` "
                         "makes the checkpoint and the fp32 build this compares against")
    prompts = [prompt_ids(spec.vocab_size, ACCURACY_TOKENS, 2 + i) for i in range(args.prompts)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    key = zlib.crc32(str(work.resolve()).encode())
    cached = Path(tempfile.gettempdir()) / f"l4acc-reference-{spec.name}-{args.prompts}-{key:08x}.npy"
    with tempfile.TemporaryDirectory(prefix="l4acc-") as tmp:
        tmp = Path(tmp)
        if not cached.exists():     # our fp32 logits, kept between runs (bench-1b5's fp32 build loads 6 GB)
            np.save(cached, logits("ours", work / "ours-fp32", prompts, tmp / "fp32.npy"))
        reference = np.load(cached)
        rows = {}
        if args.peer:
            for peer_tier in ("Q8_0", "Q4_0"):
                label = f"llama.cpp {peer_tier}"
                rows[label] = measure("llamacpp", work / "gguf" / f"model-{peer_tier}.gguf", prompts, tmp, reference)
                print(json.dumps({spec.name: {label: rows[label]}}), flush=True)
        for variant in args.variants.split(","):
            out = tmp / variant
            subprocess.run([sys.executable, __file__, "--spec", str(args.spec), "--build-worker",
                            json.dumps({"variant": variant, "spec": str(args.spec), "out": str(out),
                                        "weights": str(work / "hf")})], check=True, env=env,
                           stdout=subprocess.DEVNULL)
            rows[variant] = measure("ours", out, prompts, tmp, reference)
            print(json.dumps({spec.name: {variant: rows[variant]}}), flush=True)
            subprocess.run(["rm", "-rf", str(out)], check=True)
    print(f"\n{spec.name}: {ACCURACY_TOKENS}-token prompt (seed 2), logits vs our fp32 build; "
          f"means over {args.prompts} prompt(s)")
    print(f"{'variant':<20}{'file MB':>9}{'cosine':>9}{'top-1':>8}{'cos all':>9}{'top-1 all':>10}")
    for label, r in rows.items():
        print(f"{label:<20}{r['bytes'] / 1e6:>9.1f}{r['cosine_mean']:>9.4f}{r['top1_agreement']:>8.3f}"
              f"{r['cosine_all']:>9.4f}{r['top1_all']:>10.3f}")


if __name__ == "__main__":
    main()
