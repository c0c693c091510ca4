"""Quantization benchmark: fp32 against FP8 and INT4 builds of one model, side by side, in one process.

specs/bench-16e.yaml (~118M parameters, 16 experts) with random weights (seed 0) is built unquantized
and with each quantization (int4 both rounded to nearest and with GPTQ, the default); every build runs in
onnxruntime on this CPU. Per build: weight-file bytes (and the ratio to fp32), logits against the fp32 build
on fixed prompts (cosine per position, mean and worst; top-1 agreement; max abs error, as `l4compile
quant-report` computes them), and greedy decode tokens/s through the runtime's Engine.generate.

A control row builds fp32 with every quantizable weight multiplied by (1 + 1% Gaussian noise): how
much a random-weight model moves under a perturbation far smaller than any 8- or 4-bit format's.

The "x Q4_0" column is the weight file's size over what llama.cpp's Q4_0 stores for the same model
(`l4compile.quant.report.q4_0_bytes`: every matrix in blocks of 32 at 4.5 bits a weight, the output matrix at
Q6_K; router and norms float32).
Decode: the builds take turns in each round; "x fp32" is the median over rounds of that round's ratio.

    python bench/quantization.py [--spec specs/bench-16e.yaml] [--threads 2] [--new-tokens 128]
                                 [--init l4compile|transformers] [--rows fp32,int8,...] [--rounds 5]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from l4compile.build import BuildOptions, build  # noqa: E402
from l4compile.inspect import format_bytes  # noqa: E402
from l4compile.quant.report import compare_builds, q4_0_bytes  # noqa: E402
from l4compile.runtime import Engine  # noqa: E402
from l4compile.spec import load_spec  # noqa: E402
from l4compile.weights import RandomWeights  # noqa: E402

ROWS = {   # label -> BuildOptions fields (None: the noisy-weights control)
    "fp32": {},
    "fp8 weight-only": {"quantize": "fp8"},
    "fp8 weight-only + int8 embeddings": {"quantize": "fp8", "quantize_embeddings": True},
    "fp8 weights + activations (Q/DQ)": {"quantize": "fp8", "quantize_activations": True},
    "int4 weight-only (round to nearest)": {"quantize": "int4", "int4_method": "rtn", "quantize_embeddings": False,
                                            "quantize_lm_head": False},
    "int4 weight-only (GPTQ)": {"quantize": "int4", "quantize_embeddings": False, "quantize_lm_head": False},
    "int4 (GPTQ) + 8-bit embeddings, 4-bit lm_head": {"quantize": "int4"},
    "int8 weight-only": {"quantize": "int8", "quantize_embeddings": False, "quantize_lm_head": False},
    "int8 + int8 embeddings, lm_head": {"quantize": "int8"},
    "control: fp32 weights x (1 + 1% noise)": None,
}


class NoisyWeights(RandomWeights):
    """Another source's weights, each matmul weight multiplied elementwise by (1 + scale * N(0, 1))."""

    def __init__(self, inner: RandomWeights, scale: float) -> None:
        super().__init__(inner.seed)
        self.inner, self.scale = inner, scale

    def get(self, param):
        data = self.inner.get(param)
        if param.init == "normal" and data.ndim >= 2:   # what --quantize quantizes: not router, norms, embeddings
            rng = np.random.default_rng([self.seed, 99])
            data = data * (1 + self.scale * rng.standard_normal(data.shape, dtype=np.float32))
        return data


class TransformersStyleWeights(RandomWeights):
    """Weights drawn the way transformers initialises Llama 4 (initializer_range 0.02): every matmul weight,
    router and embedding ~ N(0, 0.02), norm weights 1. A less chaotic random model than RandomWeights'."""

    def get(self, param):
        if param.init == "norm":
            return np.ones(param.type.shape, dtype=np.float32)
        rng = np.random.default_rng([self.seed, 7, zlib.crc32(param.name.encode())])
        return 0.02 * rng.standard_normal(param.type.shape, dtype=np.float32)


def decode_rates(build_dirs: list[Path], threads: int, new_tokens: int,
                 rounds: int = 5) -> list[tuple[float, float, float]]:
    """Greedy decode of each build: (median tokens/s over `rounds`, median over rounds of its tokens/s over the
    first build's in the same round, median CPU ms per token). The builds take turns in each round, so a busy
    machine slows them alike; CPU time (all threads of this process) barely moves with the load of other
    processes, wall time does."""
    engines = [Engine.load(d, threads=threads) for d in build_dirs]
    prompt = np.random.default_rng(0).integers(0, engines[0].vocab_size, (1, 32), dtype=np.int64)
    rates: list[list[float]] = [[] for _ in engines]
    cpu: list[list[float]] = [[] for _ in engines]
    for _ in range(rounds):
        for i, engine in enumerate(engines):
            engine.generate(prompt, 2, stop_tokens=())                    # warm-up
            wall, clock = time.perf_counter(), time.process_time()
            out = engine.generate(prompt, new_tokens, stop_tokens=())
            tokens = out.shape[1] - prompt.shape[1]
            rates[i].append(tokens / (time.perf_counter() - wall))
            cpu[i].append(1e3 * (time.process_time() - clock) / tokens)
    base = np.array(rates[0])
    return [(float(np.median(r)), float(np.median(np.array(r) / base)), float(np.median(c)))
            for r, c in zip(rates, cpu)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", default=str(ROOT / "specs" / "bench-16e.yaml"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--init", choices=["l4compile", "transformers"], default="l4compile",
                        help="random weights: l4compile's RandomWeights (default) or transformers-style N(0, 0.02)")
    parser.add_argument("--rows", default=None,
                        help="comma-separated labels' first words to run (e.g. fp32,int8,int4); the first is the reference "
                             "and should be fp32 (default: every row)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    base = RandomWeights if args.init == "l4compile" else TransformersStyleWeights
    spec = load_spec(args.spec)
    root = Path(tempfile.mkdtemp(prefix="l4compile-bench-quant-"))
    try:
        dirs, rows = [], []
        wanted = None if args.rows is None else args.rows.split(",")
        rows_to_run = {label: options for label, options in ROWS.items()
                       if wanted is None or label == "fp32" or any(label.startswith(w + " ") for w in wanted)}
        for label, options in rows_to_run.items():
            weights = base(0) if options is not None else NoisyWeights(base(0), 0.01)
            dirs.append(root / str(len(dirs)))
            start = time.perf_counter()
            build(spec, dirs[-1], weights, BuildOptions(**(options or {})), log=lambda _: None)
            build_seconds = time.perf_counter() - start
            rows.append((label, compare_builds(dirs[-1], dirs[0], threads=args.threads), build_seconds))
            print(f"  built and compared: {label}", file=sys.stderr, flush=True)
        rates = decode_rates(dirs, args.threads, args.new_tokens, args.rounds)
        _print(spec, args, [row + (rate,) for row, rate in zip(rows, rates)])
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _print(spec, args, rows) -> None:
    from l4compile.inspect import build_report
    params = build_report(spec)["params_total"]
    prompts = rows[0][1]["prompts"]
    init = "RandomWeights" if args.init == "l4compile" else "transformers-style N(0, 0.02)"
    print(f"{spec.name}: {params / 1e6:.1f}M parameters, random weights ({init}, seed 0), onnxruntime CPU, "
          f"{args.threads} threads")
    print(f"accuracy: logits vs the fp32 build on {prompts['batches'] * prompts['batch_size']} prompts x "
          f"{prompts['seq_len']} tokens (seed {prompts['seed']}); decode: batch 1, 32-token prompt, "
          f"{args.new_tokens} new tokens, greedy;\n  tok/s: median of {args.rounds} rounds taken in turn, x fp32: median of "
          "the rounds' ratios; CPU ms/token: median process CPU time (all threads), steadier when other processes "
          "share the cores")
    print()
    q4_0 = q4_0_bytes(spec)
    header = f"{'build':<42} {'weights':>10} {'x fp32':>7} {'x Q4_0':>7} {'cosine mean':>11} {'worst':>7} " \
             f"{'top-1':>7} {'max|err|':>8} {'decode tok/s':>12} {'x fp32':>7} {'CPU ms/tok':>10} {'build s':>7}"
    print(header)
    print("-" * len(header))
    for label, r, build_seconds, (tps, speedup, cpu_ms) in rows:
        ratio = r["weight_bytes"] / r["reference_weight_bytes"]
        print(f"{label:<42} {format_bytes(r['weight_bytes']):>10} {ratio:>7.3f} {r['weight_bytes'] / q4_0:>7.3f} "
              f"{r['cosine_mean']:>11.5f} {r['cosine_min']:>7.4f} {r['top1_agreement']:>7.1%} "
              f"{r['max_abs_error']:>8.3f} {tps:>12.1f} {speedup:>7.2f} {cpu_ms:>10.2f} {build_seconds:>7.1f}")


if __name__ == "__main__":
    main()
