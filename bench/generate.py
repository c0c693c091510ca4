"""Generation benchmark: l4compile's runtime against transformers' Llama 4, same weights, one run.

A random model of specs/bench-16e.yaml (~100M parameters, 16 experts) is created with
transformers and saved as a checkpoint; l4compile builds it (--weights DIR) and both are timed
on the same CPU threads: prefill of a 512-token prompt (last-token logits), decode of 128 new
tokens (greedy, KV cache), peak memory of each engine (a fresh subprocess each, VmHWM),
and KV-cache bytes at long context.

The timed model has transformers' own initialisation (std 0.02), whose logits are all near 0: equal
tokens there prove little. Parity is shown on a second model of the same shapes with O(1)-scale
weights (N(0, 1/fan_in), as the parity tests draw them: tests/hf/conftest.py), where a missing
feature changes the tokens: the same prompt and greedy decode on all three engines, compared token
by token and by the last step's logits. `--parity-only` runs just that.

    python bench/generate.py [--spec specs/bench-16e.yaml] [--pipeline onnx-cpu] [--threads 2] [--parity-only]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROMPT, NEW = 512, 128


def make_checkpoint(spec_path: Path, directory: Path, strong: bool = False) -> None:
    """transformers' initialisation, or (strong) the parity tests' O(1)-scale weights."""
    import torch
    from transformers import Llama4ForCausalLM, Llama4TextConfig
    from l4compile.hf import hf_config_from_spec
    from l4compile.spec import load_spec
    torch.manual_seed(0)
    config = Llama4TextConfig(**hf_config_from_spec(load_spec(spec_path)))
    model = Llama4ForCausalLM(config).eval()
    if strong:
        sys.path.insert(0, str(ROOT))
        from tests.hf.conftest import randomize
        randomize(model, seed=0)
    model.save_pretrained(directory)


def build_ours(spec_path: Path, checkpoint: Path, out: Path, pipeline: str | None) -> None:
    from l4compile.build import BuildOptions, build
    from l4compile.hf import HFCheckpoint
    from l4compile.spec import load_spec
    build(load_spec(spec_path), out, HFCheckpoint(checkpoint), BuildOptions(pipeline=pipeline), log=lambda _: None)


def prompt_ids(vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, (1, PROMPT), dtype=np.int64)


class Ours:
    name = "l4compile (onnxruntime)"

    def __init__(self, build_dir: Path, threads: int) -> None:
        from l4compile.runtime import Engine
        self.engine = Engine.load(build_dir, threads=threads)

    def prefill(self, ids: np.ndarray):
        cache = self.engine.new_cache(ids.shape[0], ids.shape[1] + NEW)
        logits = self.engine.step(ids, cache, logits_start=ids.shape[1] - 1)
        return logits[:, -1], cache

    def decode(self, token: np.ndarray, cache):
        return self.engine.step(token[:, None], cache, logits_start=0)[:, -1], cache

    def kv_bytes(self, cache) -> int:
        return cache.nbytes


class Transformers:
    def __init__(self, checkpoint: Path, attn: str, threads: int) -> None:
        import torch
        from transformers import Llama4ForCausalLM
        torch.set_num_threads(threads)
        self.torch = torch
        self.name = f"transformers ({attn})"
        self.model = Llama4ForCausalLM.from_pretrained(checkpoint, attn_implementation=attn, dtype=torch.float32).eval()

    def prefill(self, ids: np.ndarray):
        with self.torch.inference_mode():
            out = self.model(self.torch.from_numpy(ids), use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].numpy(), out.cache if hasattr(out, "cache") else out.past_key_values

    def decode(self, token: np.ndarray, cache):
        with self.torch.inference_mode():
            out = self.model(self.torch.from_numpy(token[:, None]), cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].numpy(), out.cache if hasattr(out, "cache") else out.past_key_values

    def kv_bytes(self, cache) -> int:
        total = 0
        for layer in cache.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total


def run(engine, ids: np.ndarray, repeats: int = 3) -> dict:
    prefill_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        logits, cache = engine.prefill(ids)
        prefill_times.append(time.perf_counter() - start)
    tokens = [int(logits.argmax(-1)[0])]
    start = time.perf_counter()
    for _ in range(NEW - 1):
        logits, cache = engine.decode(np.array([tokens[-1]]), cache)
        tokens.append(int(logits.argmax(-1)[0]))
    decode = time.perf_counter() - start
    return {"prefill_s": min(prefill_times), "decode_tok_s": (NEW - 1) / decode, "tokens": tokens,
            "kv_bytes": engine.kv_bytes(cache), "last_logits": logits}


def parity(args, spec_path: Path, vocab: int) -> list[str]:
    """Greedy decode of the strong-weights model on all three engines: lines saying how close they are."""
    with tempfile.TemporaryDirectory(prefix="l4bench-parity-") as tmp:
        checkpoint, build_dir = Path(tmp) / "hf", Path(tmp) / "build"
        make_checkpoint(spec_path, checkpoint, strong=True)
        build_ours(spec_path, checkpoint, build_dir, args.pipeline)
        ids = prompt_ids(vocab)
        results = {kind: run(make_engine(kind, build_dir, checkpoint, args.threads), ids, repeats=1)
                   for kind in ("ours", "eager", "sdpa")}
    ours, lines = results["ours"], []
    scale = np.abs(ours["last_logits"]).max()
    for kind in ("eager", "sdpa"):
        theirs = results[kind]
        same = [a == b for a, b in zip(ours["tokens"], theirs["tokens"])]
        first = same.index(False) if False in same else None
        lines.append(f"parity with transformers ({kind}) on O(1)-scale weights: greedy tokens identical over {NEW} "
                     f"new tokens: {first is None}" + ("" if first is None else f" (first difference at token {first})")
                     + f"; last step's max |logit diff| {np.abs(ours['last_logits'] - theirs['last_logits']).max():.1e}"
                     f" (largest |logit| {scale:.1f}); distinct tokens generated: {len(set(ours['tokens']))}")
    return lines


def make_engine(kind: str, build_dir: Path, checkpoint: Path, threads: int):
    return Ours(build_dir, threads) if kind == "ours" else Transformers(checkpoint, kind, threads)


def worker(kind: str, build_dir: Path, checkpoint: Path, threads: int, vocab: int) -> None:
    """Peak memory of one engine alone: load, prefill, decode, report the process's VmHWM.

    (VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec.)
    """
    engine = make_engine(kind, build_dir, checkpoint, threads)
    run(engine, prompt_ids(vocab), repeats=1)
    status = Path("/proc/self/status").read_text()
    hwm_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mb": hwm_kb / 1024}))


def peak_memory(kind: str, args, build_dir: Path, checkpoint: Path, vocab: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--worker", kind, "--build-dir", str(build_dir),
                          "--checkpoint", str(checkpoint), "--threads", str(args.threads), "--vocab", str(vocab)],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=ROOT / "specs" / "bench-16e.yaml")
    parser.add_argument("--pipeline", default=None, help="l4compile pass pipeline (default: the target's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parity-only", action="store_true", help="only the parity run on O(1)-scale weights")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--build-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.build_dir, args.checkpoint, args.threads, args.vocab)
        return

    from l4compile.inspect import build_report
    from l4compile.spec import load_spec
    spec = load_spec(args.spec)
    if args.parity_only:
        print("\n".join(parity(args, args.spec, spec.vocab_size)))
        return
    with tempfile.TemporaryDirectory(prefix="l4bench-") as tmp:
        checkpoint, build_dir = Path(tmp) / "hf", Path(tmp) / "build"
        make_checkpoint(args.spec, checkpoint)
        build_ours(args.spec, checkpoint, build_dir, args.pipeline)
        ids = prompt_ids(spec.vocab_size)
        results = {}
        for kind in ("ours", "eager", "sdpa"):
            engine = make_engine(kind, build_dir, checkpoint, args.threads)
            results[kind] = {**run(engine, ids), "name": engine.name}
            del engine
        for kind in results:
            results[kind]["peak_rss_mb"] = peak_memory(kind, args, build_dir, checkpoint, spec.vocab_size)

    ours = results["ours"]
    print(f"spec {spec.name}: {build_report(spec)['params_total'] / 1e6:.0f}M parameters, "
          f"{spec.moe.num_experts if spec.moe else 0} experts; prompt {PROMPT}, {NEW} new tokens, "
          f"{args.threads} threads, float32, pipeline {args.pipeline or 'default'}")
    att = spec.attention
    naive = spec.num_layers * 2 * (PROMPT + NEW) * att.num_kv_heads * att.head_dim * 4
    print(f"{'engine':<26}{'prefill ms':>12}{'decode tok/s':>14}{'peak RSS MB':>13}{'KV bytes':>12}")
    for r in results.values():
        print(f"{r['name']:<26}{r['prefill_s'] * 1e3:>12.1f}{r['decode_tok_s']:>14.1f}{r['peak_rss_mb']:>13.0f}"
              f"{r['kv_bytes']:>12}")
    for kind in ("eager", "sdpa"):
        r = results[kind]
        print(f"ours vs {r['name']}: prefill {r['prefill_s'] / ours['prefill_s']:.2f}x faster, decode "
              f"{ours['decode_tok_s'] / r['decode_tok_s']:.2f}x faster, peak memory "
              f"{ours['peak_rss_mb'] / r['peak_rss_mb']:.2f}x, KV cache {ours['kv_bytes'] / r['kv_bytes']:.2f}x; "
              f"greedy tokens identical: {ours['tokens'] == r['tokens']} (transformers init: logits near 0, "
              f"see the parity lines)")
    print(f"KV cache at {PROMPT + NEW} tokens (measured): ours {ours['kv_bytes']} bytes = "
          f"{ours['kv_bytes'] / naive:.3f}x of a cache keeping every layer's history ({naive} bytes)")
    for name in ("scout", "maverick"):
        full = load_spec(ROOT / "specs" / f"{name}.yaml")
        kv = build_report(full, context=1_000_000)["kv_cache"]
        print(f"{name} at 1M tokens (analytic, bf16): chunk-bounded KV cache {kv['bytes_chunked'] / 1e9:.1f} GB vs "
              f"{kv['bytes_naive'] / 1e9:.1f} GB keeping every layer's history = {kv['ratio']:.3f}x")
    print("\n".join(parity(args, args.spec, spec.vocab_size)))


if __name__ == "__main__":
    main()
