"""Attention-masking benchmark: prefill through [seq, seq] masks ("masked", the lowered form) against
blockwise chunked attention (the chunked-attention pass) and, for the global layers, attention by
blocks of queries (global-attention-blocks), at 1k, 2k, 4k and 8k tokens, chunk 256.

Two models, each built from the same random weights (seed 0) with the onnx-cpu pipeline, with passes
left out:
  bench-16e              the benchmark spec as it is: 6 chunked (RoPE) layers, 2 global (NoPE) layers
      masked             without chunked-attention and global-attention-blocks: every layer masked
      chunked            without global-attention-blocks: chunked layers blockwise, global ones masked
      onnx-cpu           the whole pipeline: global layers by blocks of 256 queries too
  bench-16e-all-chunked  the same with no NoPE layer (nope_layers: []): the chunked-attention pass alone
      masked, chunked

What is measured, per (model, variant, length), each in a fresh subprocess so that nothing carries
over: wall time of one prefill (batch 1, `Engine.step` with logits for the last position only, as
generation does), the best of `--repeats` runs; and the process's peak resident memory (ru_maxrss,
which is what onnxruntime's arena really takes, unlike tracemalloc), with the resident memory right
after the model was loaded, so the prefill's own peak is the difference.

    python bench/chunked_prefill.py [--threads 2] [--lengths 1024,2048,4096,8192] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# variant -> passes left out of onnx-cpu
VARIANTS = {"masked": ("chunked-attention", "global-attention-blocks"), "chunked": ("global-attention-blocks",),
            "onnx-cpu": ()}
MODEL_VARIANTS = {"bench-16e": ("masked", "chunked", "onnx-cpu"), "bench-16e-all-chunked": ("masked", "chunked")}


def models():
    from l4compile.spec import loads_spec
    text = (ROOT / "specs" / "bench-16e.yaml").read_text()
    all_chunked = text.replace("name: bench-16e", "name: bench-16e-all-chunked").replace(
        "nope_interval: 4", "nope_layers: []")
    return {"bench-16e": loads_spec(text, "bench-16e.yaml"),
            "bench-16e-all-chunked": loads_spec(all_chunked, "bench-16e-all-chunked")}


def rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child(build_dir: str, seq: int, threads: int, repeats: int) -> None:
    """One measurement: load, prefill `seq` tokens `repeats` times, print JSON."""
    from l4compile.runtime import Engine
    engine = Engine.load(build_dir, threads=threads)
    loaded = rss_now()
    ids = np.random.default_rng(0).integers(0, engine.vocab_size, (1, seq), dtype=np.int64)
    times = []
    for _ in range(repeats):
        cache = engine.new_cache(1, seq)
        start = time.perf_counter()
        engine.step(ids, cache, logits_start=seq - 1)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": min(times), "peak": peak, "loaded": loaded}))


def measure(build_dir: Path, seq: int, threads: int, repeats: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(build_dir), str(seq), str(threads), str(repeats)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", default="1024,2048,4096,8192")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        build_dir, seq, threads, repeats = args.child
        child(build_dir, int(seq), int(threads), int(repeats))
        return
    from l4compile.build import BuildOptions, build
    from l4compile.weights import RandomWeights
    lengths = [int(n) for n in args.lengths.split(",")]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-chunked-") as tmp:
        for model, spec in models().items():
            for variant in MODEL_VARIANTS[model]:
                out = Path(tmp) / f"{model}-{variant}"
                build(spec, out, RandomWeights(0), BuildOptions(pipeline="onnx-cpu", disable_passes=VARIANTS[variant]),
                      log=lambda _: None)
                for seq in lengths:
                    r = measure(out, seq, args.threads, args.repeats)
                    rows[model, variant, seq] = r
                    print(f"{model:<22} {variant:<9} {seq:>5} tokens: {r['seconds']:7.2f} s, peak RSS "
                          f"{r['peak'] / 2**20:7.0f} MiB (loaded {r['loaded'] / 2**20:.0f} MiB)", flush=True)
    print()
    print(f"prefill, batch 1, chunk 256, {args.threads} threads (onnxruntime CPU), best of {args.repeats} runs; "
          f"peak = ru_maxrss of a fresh process (MiB), growth = peak minus RSS after loading")
    for model, variants in MODEL_VARIANTS.items():
        print(f"\n{model}")
        print(f"{'tokens':>6}" + "".join(f" {v + ' s':>11} {'peak':>6} {'growth':>6}" for v in variants)
              + "".join(f" {'speedup ' + v:>17}" for v in variants[1:]))
        for seq in lengths:
            r = [rows[model, v, seq] for v in variants]
            cells = "".join(f" {x['seconds']:11.2f} {x['peak'] / 2**20:6.0f} {(x['peak'] - x['loaded']) / 2**20:6.0f}"
                            for x in r)
            print(f"{seq:>6}{cells}" + "".join(f" {r[0]['seconds'] / x['seconds']:16.2f}x" for x in r[1:]))
        for variant in variants:
            steps = [rows[model, variant, b]["seconds"] / rows[model, variant, a]["seconds"]
                     for a, b in zip(lengths, lengths[1:])]
            print(f"  {variant:<9} time x per doubling of tokens: {', '.join(f'{s:.2f}' for s in steps)} "
                  f"(linear 2.0, quadratic 4.0)")


if __name__ == "__main__":
    main()
