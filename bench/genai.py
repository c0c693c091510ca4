"""onnxruntime-genai against our runtime on the same weights: decode tokens/s and prefill time, in one run.

A spec (default specs/bench-16e.yaml, ~118M parameters) is built twice from the same random weights
(seed 0): `--target onnx` for our Engine and `--target ort-genai` for onnxruntime-genai (its Python
API, CPU). Each round runs both engines, the first alternating, on the same random prompt (greedy):
  - prefill: time to the first new token (the prompt's forward pass and one pick);
  - decode: tokens/s over the remaining new tokens.
Prints each round as it ends (stderr), then medians over rounds and the medians of the per-round
ratios genai / ours. Also the KV-cache memory each keeps at --context (genai: every layer's whole
history; ours: chunked layers one chunk).

    python bench/genai.py [--spec specs/bench-16e.yaml] [--prompt 256] [--new 64] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def build_both(spec_file: Path, out: Path) -> tuple[Path, Path]:
    from l4compile.build import BuildOptions, build
    from l4compile.spec import load_spec
    from l4compile.weights import RandomWeights
    spec = load_spec(spec_file)
    dirs = []
    for target in ("onnx", "ort-genai"):
        start = time.perf_counter()
        build(spec, out / target, RandomWeights(0), BuildOptions(target=target), log=lambda _: None)
        say(f"built {spec.name} --target {target} in {time.perf_counter() - start:.1f} s")
        dirs.append(out / target)
    return dirs[0], dirs[1]


def ours(engine, prompt: np.ndarray, new: int) -> tuple[float, float, list[int]]:
    """(seconds to the first new token, decode tokens/s after it, the new tokens)."""
    start = time.perf_counter()
    stamps, tokens = [], []
    for token in engine.stream(prompt, new, temperature=0.0, stop_tokens=()):
        stamps.append(time.perf_counter())
        tokens.append(int(token))
    return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0]), tokens


def genai(og, model, prompt: np.ndarray, new: int) -> tuple[float, float, list[int]]:
    """The same through onnxruntime-genai's generator (greedy; EOS ignored by min_length)."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, min_length=len(prompt) + new, do_sample=False)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(prompt.astype(np.int32)[None])
    stamps = []
    for _ in range(new):
        generator.generate_next_token()
        stamps.append(time.perf_counter())
    tokens = [int(t) for t in generator.get_sequence(0)[len(prompt):]]
    return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0]), tokens


def kv_bytes(spec, context: int, genai_layout: bool, itemsize: int = 2) -> int:
    """KV-cache bytes of one sequence of `context` tokens: genai keeps every position of every layer."""
    att = spec.attention
    per_position = 2 * att.num_kv_heads * att.head_dim * itemsize
    return sum(per_position * (context if genai_layout or layer.attention != "chunked" else
                               min(context, att.chunk_size)) for layer in spec.layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "specs" / "bench-16e.yaml"))
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=1_000_000, help="context of the KV memory comparison")
    args = parser.parse_args()
    import onnxruntime_genai as og

    from l4compile.runtime import Engine
    from l4compile.spec import load_spec
    spec = load_spec(args.spec)
    with tempfile.TemporaryDirectory(prefix="l4compile-bench-genai-") as tmp:
        onnx_dir, genai_dir = build_both(Path(args.spec), Path(tmp))
        engine = Engine.load(onnx_dir, threads=args.threads)
        config = og.Config(str(genai_dir))
        config.clear_providers()   # CPU
        model = og.Model(config)
        say(f"onnxruntime-genai {og.__version__}; our Engine with {args.threads} threads, genai with onnxruntime's "
            "default threads")
        prompt = np.random.default_rng(1).integers(3, spec.vocab_size, args.prompt).astype(np.int64)
        ours(engine, prompt[:16], 4), genai(og, model, prompt[:16], 4)   # warm-up: sessions, first allocations
        rows = []
        for r in range(args.rounds):
            runs = {}
            order = ("ours", "genai") if r % 2 == 0 else ("genai", "ours")
            for name in order:
                runs[name] = ours(engine, prompt, args.new) if name == "ours" else genai(og, model, prompt, args.new)
            same = runs["ours"][2] == runs["genai"][2]
            rows.append((runs["ours"][0], runs["genai"][0], runs["ours"][1], runs["genai"][1]))
            say(f"round {r + 1}/{args.rounds} ({' first, '.join(order)} second): prefill ours {rows[-1][0] * 1e3:.1f} ms, "
                f"genai {rows[-1][1] * 1e3:.1f} ms; decode ours {rows[-1][2]:.1f} tok/s, genai {rows[-1][3]:.1f} tok/s; "
                f"tokens {'identical' if same else 'DIFFER'}")
    med = [statistics.median(col) for col in zip(*rows)]
    prefill_ratio = statistics.median(g / o for o, g, _, _ in rows)
    decode_ratio = statistics.median(g / o for _, _, o, g in rows)
    print(f"{spec.name}, prompt {args.prompt} tokens, {args.new} new, {args.rounds} rounds (medians)")
    print(f"  prefill (to first token)  ours {med[0] * 1e3:8.1f} ms   genai {med[1] * 1e3:8.1f} ms   "
          f"genai/ours {prefill_ratio:.2f}x")
    print(f"  decode                    ours {med[2]:8.1f} tok/s genai {med[3]:8.1f} tok/s genai/ours {decode_ratio:.2f}x")
    ours_kv, genai_kv = kv_bytes(spec, args.context, False), kv_bytes(spec, args.context, True)
    print(f"  KV cache at {args.context} tokens (bf16, one sequence): ours {ours_kv / 1e9:.2f} GB, "
          f"genai {genai_kv / 1e9:.2f} GB ({genai_kv / ours_kv:.2f}x)")


if __name__ == "__main__":
    main()
