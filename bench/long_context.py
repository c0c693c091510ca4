"""Long context: prefill time and decode speed after prompts of 2k to 64k tokens, peak memory.

Engines, same weights (a random transformers model of specs/bench-16e.yaml saved as a checkpoint
and built by l4compile from it), float32, the same CPU threads:

- `ours`: the onnx-cpu build (attention over in-place per-row KV caches);
- `previous`: the same passes lowered for the sequence-major cache (the decode path before the
  in-place cache: each step concatenates and transposes the cached history);
- `transformers` (sdpa), up to --transformers-max tokens (its masks grow with the square of the context);
- `llamacpp`: llama.cpp (bench/llamacpp.py: built once from the llama-cpp-python 0.3.36 source
  distribution) on the same checkpoint converted to GGUF F32 by its own converter, run in this process
  through its ctypes bindings (prompt in batches of 512, then one token per llama_decode). llama.cpp
  hard-codes Llama 4's chunk size and temperature floor (8192): it runs only on a spec with both at
  8192 (specs/bench-16e-8k.yaml), and is skipped with a line saying so on others.

For each context the engines run in alternating rounds: prefill of the prompt (last-token logits),
then --new greedy tokens; decode tokens/s counts the steps after the first new token. Reported:
medians over rounds, and medians of per-round ratios (decode after N / decode after the first
context in the same round; ours / previous). Peak memory: one prefill + decode per engine and context
in a fresh process (VmHWM).

    python bench/long_context.py [--contexts 2048 8192 32768 65536] [--rounds 3] [--new 32] [--threads 2]
        [--spec specs/bench-16e-8k.yaml --engines ours llamacpp transformers]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from generate import Transformers, make_checkpoint  # noqa: E402  (bench/generate.py)

PREVIOUS_PIPELINE = """name: onnx-cpu-sequence-major
description: onnx-cpu's passes over the sequence-major KV cache (the decode path before the in-place cache)
kv_layout: sequence-major
passes: [constant-fold, {moe-dispatch: {impl: ort}}, chunked-attention, global-attention-blocks, cse, dce]
"""


class Ours:
    def __init__(self, build_dir: Path, threads: int, name: str) -> None:
        from l4compile.runtime import Engine
        self.engine, self.name = Engine.load(build_dir, threads=threads), name

    def prefill(self, ids: np.ndarray, new: int):
        cache = self.engine.new_cache(ids.shape[0], ids.shape[1] + new)
        return self.engine.step(ids, cache, logits_start=ids.shape[1] - 1)[:, -1], cache

    def decode(self, token: np.ndarray, cache):
        return self.engine.step(token[:, None], cache, logits_start=0)[:, -1], cache


class LlamaCppEngine:
    """llama.cpp through its bindings; the "cache" is the number of positions filled."""

    def __init__(self, gguf: Path, threads: int, context: int) -> None:
        from llamacpp import LlamaCpp, Model
        self.model = Model(LlamaCpp.ensure(), gguf, threads, context=context)

    def prefill(self, ids: np.ndarray, new: int):
        self.model.reset()
        return self.model._decode([int(t) for t in ids[0]], 0, False)[-1:], ids.shape[1]

    def decode(self, token: np.ndarray, position: int):
        return self.model._decode([int(token[0])], position, False)[-1:], position + 1


def llamacpp_gguf(checkpoint: Path, out: Path) -> Path:
    from llamacpp import LlamaCpp
    return LlamaCpp.ensure().convert(checkpoint, out, ("F32",))["F32"]


def llamacpp_refusal(spec) -> str | None:
    """Why llama.cpp cannot run this spec as the same model (None: it can)."""
    att = spec.attention
    floor = att.temperature_tuning.floor_scale if att.temperature_tuning else 8192
    if att.chunk_size != 8192 or floor != 8192:
        return (f"llama.cpp skipped: it hard-codes Llama 4's chunk size and temperature floor (8192); "
                f"{spec.name} has {att.chunk_size} and {floor} (use specs/bench-16e-8k.yaml)")
    return None


class HF(Transformers):
    def prefill(self, ids: np.ndarray, new: int):
        return super().prefill(ids)


def build(spec_path: Path, checkpoint: Path, out: Path, pipeline: str | None) -> None:
    from l4compile.build import BuildOptions, build as build_dir
    from l4compile.hf import HFCheckpoint
    from l4compile.spec import load_spec
    build_dir(load_spec(spec_path), out, HFCheckpoint(checkpoint), BuildOptions(pipeline=pipeline), log=lambda _: None)


def measure(engine, ids: np.ndarray, new: int) -> dict:
    start = time.perf_counter()
    logits, cache = engine.prefill(ids, new)
    prefill = time.perf_counter() - start
    tokens = [int(logits.argmax(-1)[0])]
    start = time.perf_counter()
    for _ in range(new - 1):
        logits, cache = engine.decode(np.array([tokens[-1]]), cache)
        tokens.append(int(logits.argmax(-1)[0]))
    return {"prefill_s": prefill, "decode_tok_s": (new - 1) / (time.perf_counter() - start), "tokens": tokens}


def make_engine(kind: str, dirs: dict, threads: int, context: int = 0):
    if kind == "transformers":
        return HF(dirs["checkpoint"], "sdpa", threads)
    if kind == "llamacpp":
        return LlamaCppEngine(dirs["gguf"], threads, context)
    return Ours(dirs[kind], threads, kind)


def worker(args) -> None:
    """Peak memory of one engine alone over one prefill + decode (VmHWM: ru_maxrss carries over exec)."""
    dirs = json.loads(args.dirs)
    dirs = {k: Path(v) for k, v in dirs.items()}
    engine = make_engine(args.worker, dirs, args.threads, args.context + args.new + 8)
    measure(engine, prompt(args.vocab, args.context), args.new)
    status = Path("/proc/self/status").read_text()
    print(json.dumps({"peak_mb": next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmHWM:")) / 1024}))


def peak_memory(kind: str, dirs: dict, args, context: int, vocab: int) -> float | None:
    cmd = [sys.executable, __file__, "--worker", kind, "--dirs", json.dumps({k: str(v) for k, v in dirs.items()}),
           "--threads", str(args.threads), "--vocab", str(vocab), "--context", str(context), "--new", str(args.new)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        print(f"  peak memory of {kind} at {context}: failed ({(out.stderr.strip().splitlines() or ['?'])[-1]})")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def prompt(vocab: int, n: int) -> np.ndarray:
    return np.random.default_rng(n).integers(0, vocab, (1, n), dtype=np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=ROOT / "specs" / "bench-16e.yaml")
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 32768, 65536])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new", type=int, default=32, help="new tokens per measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", nargs="+", default=["ours", "previous", "transformers"])
    parser.add_argument("--transformers-max", type=int, default=8192,
                        help="longest context given to transformers (its attention masks are [seq, seq])")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--dirs", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--context", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from l4compile.spec import load_spec
    spec = load_spec(args.spec)
    contexts = sorted(args.contexts)
    if "llamacpp" in args.engines and llamacpp_refusal(spec):
        print(llamacpp_refusal(spec))
        args.engines = [e for e in args.engines if e != "llamacpp"]
    with tempfile.TemporaryDirectory(prefix="l4long-") as tmp:
        tmp = Path(tmp)
        dirs = {"checkpoint": tmp / "hf", "ours": tmp / "ours", "previous": tmp / "previous"}
        make_checkpoint(args.spec, dirs["checkpoint"])
        if "llamacpp" in args.engines:
            dirs["gguf"] = llamacpp_gguf(dirs["checkpoint"], tmp / "gguf")
        (tmp / "previous.yaml").write_text(PREVIOUS_PIPELINE)
        build(args.spec, dirs["checkpoint"], dirs["ours"], None)
        if "previous" in args.engines:
            build(args.spec, dirs["checkpoint"], dirs["previous"], str(tmp / "previous.yaml"))
        engines = {kind: make_engine(kind, dirs, args.threads, contexts[-1] + args.new + 8) for kind in args.engines}
        runs: dict[tuple[str, int], list[dict]] = {}
        for r in range(args.rounds):
            for n in contexts:
                ids = prompt(spec.vocab_size, n)
                order = list(engines) if r % 2 == 0 else list(reversed(engines))
                for kind in order:
                    if kind == "transformers" and n > args.transformers_max:
                        continue
                    result = measure(engines[kind], ids, args.new)
                    runs.setdefault((kind, n), []).append(result)
                    print(f"round {r} context {n} {kind}: prefill {result['prefill_s']:.2f} s, "
                          f"decode {result['decode_tok_s']:.1f} tok/s", flush=True)
        del engines
        memory = {}
        for kind in [] if args.no_memory else args.engines:
            for n in contexts:
                if (kind, n) in runs:
                    memory[(kind, n)] = peak = peak_memory(kind, dirs, args, n, spec.vocab_size)
                    print(f"peak memory {kind} at {n}: " + ("-" if peak is None else f"{peak:.0f} MB"), flush=True)
    report(spec, args, contexts, runs, memory)


def report(spec, args, contexts: list[int], runs: dict, memory: dict) -> None:
    med = statistics.median
    print(f"\nspec {spec.name}, float32, {args.threads} threads, {args.rounds} rounds, {args.new} new tokens per "
          "measurement; medians")
    print(f"{'engine':<14}{'context':>9}{'prefill s':>11}{'decode tok/s':>14}{'vs first ctx':>14}{'peak MB':>9}")
    for kind in args.engines:
        for n in contexts:
            if (kind, n) not in runs:
                continue
            rs, base = runs[(kind, n)], runs[(kind, contexts[0])]
            ratio = med(r["decode_tok_s"] / b["decode_tok_s"] for r, b in zip(rs, base))
            peak = memory.get((kind, n))
            print(f"{kind:<14}{n:>9}{med(r['prefill_s'] for r in rs):>11.2f}{med(r['decode_tok_s'] for r in rs):>14.1f}"
                  f"{ratio:>13.2f}x{'-' if peak is None else round(peak):>9}")
    for other in ("previous", "transformers", "llamacpp"):
        if other not in args.engines or "ours" not in args.engines:
            continue
        for n in contexts:
            if (other, n) not in runs:
                continue
            pairs = list(zip(runs[("ours", n)], runs[(other, n)]))
            same = all(a["tokens"] == b["tokens"] for a, b in pairs)
            print(f"ours / {other} at {n}: decode {med(a['decode_tok_s'] / b['decode_tok_s'] for a, b in pairs):.2f}x, "
                  f"prefill {med(b['prefill_s'] / a['prefill_s'] for a, b in pairs):.2f}x faster; "
                  f"greedy tokens identical: {same}")


if __name__ == "__main__":
    main()
