"""MoE dispatch benchmark: decode time per token of a 16-expert and a 128-expert model of the same
active size (specs/bench-16e.yaml, specs/bench-128e.yaml), with and without the moe-dispatch pass.

Every variant of a spec is built from the same random weights (seed 0) with the onnx-cpu pipeline,
moe-dispatch switched off ("unfused": every expert on every token, as lowered) or set to one of its
lowerings; all run in this one process with onnxruntime on the CPU. Each variant prefills a prompt
then decodes token by token against the KV cache; the time per token is the median over the decode
steps, and the best of the rounds counts (the two models of a variant are measured back to back, so
that a busy machine slows both). The prefill time of the prompt is shown too (it is where the
lowerings differ most). The prefill logits of every variant are checked against the unfused ones.

    python bench/moe_dispatch.py [--threads 2] [--prompt 128] [--tokens 24] [--rounds 3]
                                 [--impls ort,grouped,gather,auto]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPECS = ("bench-16e", "bench-128e")


def build_variant(spec, impl: str | None, out: Path) -> None:
    """onnx-cpu without moe-dispatch (impl None), or with moe-dispatch set to `impl` (a pipeline file)."""
    import yaml

    from l4compile.build import BuildOptions, build
    from l4compile.passes import PIPELINES
    from l4compile.weights import RandomWeights
    if impl is None:
        options = BuildOptions(pipeline="onnx-cpu", disable_passes=("moe-dispatch",))
    else:
        passes = [{name: {**opts, "impl": impl}} if name == "moe-dispatch" else ({name: opts} if opts else name)
                  for name, opts in PIPELINES["onnx-cpu"].passes]
        pipeline = out.parent / f"moe-{impl}.yaml"
        pipeline.write_text(yaml.safe_dump({"name": f"onnx-cpu-moe-{impl}", "passes": passes}))
        options = BuildOptions(pipeline=str(pipeline))
    build(spec, out, RandomWeights(0), options, log=lambda _: None)


def measure(build_dir: Path, prompt: np.ndarray, tokens: int, threads: int) -> tuple[float, float, np.ndarray]:
    """(prefill seconds, median decode ms per token, prefill logits) of one variant."""
    from l4compile.runtime import Engine
    engine = Engine.load(build_dir, threads=threads)
    cache = engine.new_cache(1, prompt.shape[1] + tokens + 3)
    start = time.perf_counter()
    logits = engine.step(prompt, cache, logits_start=0)
    prefill = time.perf_counter() - start
    token = logits[:, -1:].argmax(-1)
    times = []
    for i in range(tokens + 3):
        start = time.perf_counter()
        token = engine.step(token, cache, logits_start=0).argmax(-1)
        if i >= 3:  # warm-up steps are not counted
            times.append(time.perf_counter() - start)
    return prefill, 1e3 * statistics.median(times), logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3, help="measure every variant this many times, interleaved; "
                                                              "the best round counts (robust to a busy machine)")
    parser.add_argument("--impls", default="ort,grouped,gather,auto")
    args = parser.parse_args()
    from l4compile.spec import load_spec
    variants = [None] + args.impls.split(",")
    labels = [impl or "unfused" for impl in variants]
    decode: dict[tuple[str, str], list[float]] = {}
    prefill: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-moe-") as tmp:
        prompts, dirs, reference = {}, {}, {}
        for name in SPECS:
            spec = load_spec(ROOT / "specs" / f"{name}.yaml")
            prompts[name] = np.random.default_rng(0).integers(0, spec.vocab_size, (1, args.prompt), dtype=np.int64)
            for impl, label in zip(variants, labels):
                dirs[name, label] = Path(tmp) / f"{name}-{label}"
                start = time.perf_counter()
                build_variant(spec, impl, dirs[name, label])
                print(f"built {name} {label} in {time.perf_counter() - start:.1f} s", flush=True)
        for round_ in range(args.rounds):
            for label in labels:      # 16e and 128e of one variant back to back: their ratio sees the same load
                for name in SPECS:
                    seconds, ms, logits = measure(dirs[name, label], prompts[name], args.tokens, args.threads)
                    reference.setdefault(name, logits)
                    diff = float(np.abs(logits - reference[name]).max())
                    assert diff < 1e-3, f"{name} {label}: prefill logits differ from the unfused ones by {diff}"
                    decode.setdefault((name, label), []).append(ms)
                    prefill.setdefault((name, label), []).append(seconds)
                    print(f"round {round_ + 1}: {name:<11} {label:<8} decode {ms:8.2f} ms/token, prefill "
                          f"{seconds:6.2f} s  (prefill logits vs unfused: max |diff| {diff:.1e})", flush=True)
    best = {key: min(values) for key, values in decode.items()}
    print()
    print(f"decode, batch 1, after a {args.prompt}-token prompt: median of {args.tokens} tokens, best of "
          f"{args.rounds} rounds, {args.threads} threads (onnxruntime CPU); same weights per model")
    print(f"{'variant':<9} {'16e ms/tok':>11} {'128e ms/tok':>12} {'128e / 16e':>11} {'128e vs unfused 128e':>21}"
          f" {'prefill 16e s':>14} {'prefill 128e s':>15}")
    for label in labels:
        a, b = best["bench-16e", label], best["bench-128e", label]
        speedup = "(baseline)" if label == "unfused" else f"{best['bench-128e', 'unfused'] / b:.1f}x faster"
        print(f"{label:<9} {a:11.2f} {b:12.2f} {b / a:10.2f}x {speedup:>21} {min(prefill['bench-16e', label]):14.2f} "
              f"{min(prefill['bench-128e', label]):15.2f}")


if __name__ == "__main__":
    main()
