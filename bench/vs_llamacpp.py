"""l4compile (onnxruntime, CPU) against llama.cpp on the same weights, per precision tier.

For each spec (default: specs/bench-16e-8k.yaml, then specs/bench-1b5.yaml; both with llama.cpp's
hard-coded chunk size and temperature floor, 8192): one random HF checkpoint (the parity tests'
O(1)-scale weights, seed 0), built by l4compile at fp32, int8 and int4 (`--quantize`, with its
defaults: quantized embedding table and lm_head) and converted by llama.cpp's own converter to
F32, then `llama-quantize`d to Q8_0 and Q4_0 (bench/llamacpp.py).

1. Check: greedy continuations of one prompt by our fp32 build and llama.cpp's F32 file must be the
   same tokens (else the two do not compute the same model and nothing is timed).
2. Accuracy: logits of every position of a prompt, each tier against our fp32 (cosine, top-1 agreement).
3. Speed, in alternating rounds (ours first in even rounds, llama.cpp first in odd ones), each
   measurement in its own process so that only one model is in memory: prefill of --prompt tokens,
   decode of --new tokens from an empty cache and after the prompt. llama.cpp: `llama-bench -p P -n N -r R`
   and `-n N -d P -r R`. Ours: Engine steps, warmed up as llama-bench warms up (a prompt run and a one-token
   generation), each figure the mean of --repetitions (R) runs' tok/s as llama-bench's.
   Reported: medians over rounds, and medians of the per-round ratios ours / llama.cpp.
4. Bandwidth bound: bytes a decode step must read (the file's bytes times active matmul parameters /
   all parameters: the embedding table is read one row a token, the unchosen experts not at all)
   divided by the machine's read bandwidth (best of several matrix-vector products over a 1 GiB
   float32 matrix, numpy's BLAS on --threads threads); decode tok/s as a fraction of it.

Last line: `decode ours/llama.cpp: fp32 R1 int8 R2 int4 R3` (decode from an empty cache, the last spec's).

    python bench/vs_llamacpp.py [--specs specs/bench-16e-8k.yaml specs/bench-1b5.yaml] [--rounds 3]
        [--repetitions 3] [--threads 2] [--prompt 512] [--new 128] [--work DIR] [--tiers fp32 int8 int4]

Checkpoints, builds and GGUF files are kept under --work (default ~/.cache/l4compile-bench/vs) and
reused by later runs of the same spec; `--rebuild` makes our builds again (after a compiler change).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from llamacpp import LLAMA_CPP_COMMIT, VERSION, LlamaCpp, Model, cache_dir, file_bytes  # noqa: E402

TIERS = {"fp32": "F32", "int8": "Q8_0", "int4": "Q4_0"}       # ours -> llama.cpp's peer
CHECK_TOKENS = 16
ACCURACY_TOKENS = 128


# ---- preparation ---------------------------------------------------------------------------

def prepare(spec_path: Path, work: Path, peer: LlamaCpp, int4_method: str, rebuild: bool = False,
            tiers: tuple[str, ...] = tuple(TIERS)) -> dict:
    """The checkpoint, our builds and the GGUF files of `tiers` and fp32 (each made once)."""
    sys.path.insert(0, str(ROOT))
    from generate import make_checkpoint
    work.mkdir(parents=True, exist_ok=True)
    hf = work / "hf"
    if not (hf / "config.json").exists():
        print(f"writing a random checkpoint of {spec_path.name} to {hf}", flush=True)
        make_checkpoint(spec_path, hf, strong=True)
    ours = {}
    for tier in TIERS:
        if tier not in tiers and tier != "fp32":
            continue
        out = work / f"ours-{tier}"
        if rebuild or not (out / "manifest.json").exists():
            print(f"building ours {tier}", flush=True)
            cmd = [sys.executable, "-m", "l4compile.cli", "build", str(spec_path), "--weights", str(hf), "-o", str(out),
                   "--force"] + ([] if tier == "fp32" else ["--quantize", tier]) \
                + (["--int4-method", int4_method] if tier == "int4" else [])
            subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        ours[tier] = out
    gguf = peer.convert(hf, work / "gguf", tuple(TIERS[t] for t in TIERS if t in tiers or t == "fp32"))
    return {"hf": hf, "ours": ours, "gguf": gguf}


def prompt_ids(vocab: int, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, n, dtype=np.int64)


# ---- workers (one model per process) -------------------------------------------------------

def worker(job: dict) -> dict:
    if job["engine"] == "ours":
        from l4compile.runtime import Engine
        return ours_job(Engine.load(Path(job["path"]), threads=job["threads"]), job)
    peer = LlamaCpp.ensure()
    if job["task"] == "speed":
        reps = job["repetitions"]
        pre = peer.bench(Path(job["path"]), job["threads"], prompt=job["prompt"], generate=job["new"], repetitions=reps)
        after = peer.bench(Path(job["path"]), job["threads"], generate=job["new"], depth=job["prompt"],
                           repetitions=reps)
        return {"prefill": pre["prefill"], "decode": pre["decode"], "decode_after": after["decode"]}
    model = Model(peer, Path(job["path"]), job["threads"], context=max(job["prompt"], ACCURACY_TOKENS) + 64)
    ids = np.asarray(job["ids"], dtype=np.int64)
    if job["task"] == "greedy":
        return {"tokens": model.greedy(ids, CHECK_TOKENS)}
    np.save(job["out"], model.logits(ids))
    return {}


def ours_job(engine, job: dict) -> dict:
    ids = np.asarray(job["ids"], dtype=np.int64)[None]
    if job["task"] == "greedy":
        out = engine.generate(ids, CHECK_TOKENS)
        return {"tokens": [int(t) for t in out[0, ids.shape[1]:]]}
    if job["task"] == "logits":
        np.save(job["out"], engine.logits(ids)[0])
        return {}
    prompt, new, reps = job["prompt"], job["new"], job["repetitions"]

    def decode(cache, token: int) -> float:
        start = time.perf_counter()
        for _ in range(new):
            token = int(engine.step(np.array([[token]]), cache, logits_start=0)[0, -1].argmax())
        return new / (time.perf_counter() - start)

    def prefilled():   # a cache holding the prompt, and the rate at which it was filled
        cache = engine.new_cache(1, prompt + new + 2)
        start = time.perf_counter()
        logits = engine.step(ids[:, :prompt], cache, logits_start=prompt - 1)
        return cache, int(logits[0, -1].argmax()), prompt / (time.perf_counter() - start)

    # Warm-up, as llama-bench's: a prompt run and a one-token generation before anything is timed. Then, as
    # llama-bench -r: each figure is the mean of `reps` runs' tok/s, each run from a fresh (or refilled) cache.
    engine.step(ids[:, :16], engine.new_cache(1, 32), logits_start=15)
    engine.step(ids[:, :1], engine.new_cache(1, 4), logits_start=0)
    rate = statistics.mean(decode(engine.new_cache(1, new + 2), 5) for _ in range(reps))
    prefill, after = [], []
    for _ in range(reps):
        cache, token, filled = prefilled()
        prefill.append(filled)
        after.append(decode(cache, token))
    return {"prefill": statistics.mean(prefill), "decode": rate, "decode_after": statistics.mean(after)}


def run_job(job: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(job)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        raise RuntimeError(f"{job['engine']} {job['task']} failed (exit status {out.returncode}): "
                           f"{out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- measurements --------------------------------------------------------------------------

def check_same_tokens(files: dict, args, ids: np.ndarray) -> list[int]:
    common = {"task": "greedy", "threads": args.threads, "ids": ids.tolist(), "prompt": len(ids)}
    ours = run_job({**common, "engine": "ours", "path": str(files["ours"]["fp32"])})["tokens"]
    theirs = run_job({**common, "engine": "llamacpp", "path": str(files["gguf"]["F32"])})["tokens"]
    if ours != theirs:
        raise SystemExit(f"ours fp32 and llama.cpp F32 continue the prompt differently:\n  ours      {ours}\n"
                         f"  llama.cpp {theirs}\nthey do not compute the same model: nothing timed")
    return ours


def accuracy(files: dict, args, ids: np.ndarray, tmp: Path) -> dict:
    """Cosine and top-1 agreement of every tier's logits with our fp32 logits."""
    from l4compile.quant.report import logits_agreement
    logits = {}
    for tier, peer_tier in TIERS.items():
        if tier not in args.tiers and tier != "fp32":
            continue
        for engine, path, label in (("ours", files["ours"][tier], tier), ("llamacpp", files["gguf"][peer_tier], peer_tier)):
            out = tmp / f"{label}.npy"
            run_job({"engine": engine, "task": "logits", "path": str(path), "threads": args.threads,
                     "ids": ids.tolist(), "prompt": len(ids), "out": str(out)})
            logits[label] = np.load(out)
    reference = logits["fp32"]
    return {label: logits_agreement(value[None], reference[None]) for label, value in logits.items()}


def speed(files: dict, args) -> tuple[dict, list[float]]:
    """Per (engine, tier): each round's figures; and the read bandwidth probed at the start of each round (this
    host's bandwidth drifts, by 1.5x within minutes)."""
    runs: dict[tuple[str, str], list[dict]] = {}
    probes = []
    ids = prompt_ids(args.vocab, args.prompt, 1).tolist()
    for r in range(args.rounds):
        probes.append(bandwidth(args.threads))
        for tier, peer_tier in TIERS.items():
            if tier not in args.tiers:
                continue
            order = [("ours", files["ours"][tier], tier), ("llamacpp", files["gguf"][peer_tier], peer_tier)]
            for engine, path, label in (order if r % 2 == 0 else order[::-1]):
                result = run_job({"engine": engine, "task": "speed", "path": str(path), "threads": args.threads,
                                  "ids": ids, "prompt": args.prompt, "new": args.new,
                                  "repetitions": args.repetitions})
                runs.setdefault((engine, tier), []).append(result)
                print(f"  round {r} {label:<5} ({engine}): prefill {result['prefill']:.1f} tok/s, decode "
                      f"{result['decode']:.1f}, after {args.prompt}: {result['decode_after']:.1f}", flush=True)
    return runs, probes


def bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: best of `repeats` float32 matrix-vector products over `gib` GiB."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(threads))
    n = int((gib * 2 ** 30 / 4) ** 0.5)
    a = np.ones((n, n), dtype=np.float32)
    v = np.ones(n, dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ v
        best = min(best, time.perf_counter() - start)
    return a.nbytes / best


# ---- report --------------------------------------------------------------------------------

def report(spec, files: dict, acc: dict, runs: dict, probes: list[float], args) -> dict[str, float]:
    from l4compile.spec.params import active_matmul_params, params_breakdown
    med = statistics.median
    total = sum(params_breakdown(spec).values())
    active = active_matmul_params(spec)
    bw = med(probes)
    print(f"\n{spec.name}: {total / 1e9:.2f}B parameters, {active / 1e6:.0f}M active matmul parameters per token; "
          f"{args.threads} threads, prompt {args.prompt}, {args.new} new tokens, {args.rounds} rounds (medians); "
          f"read bandwidth {bw / 1e9:.1f} GB/s (median of the rounds' probes, {min(probes) / 1e9:.1f}-"
          f"{max(probes) / 1e9:.1f})")
    print(f"{'tier':<6}{'engine':<11}{'file MB':>9}{'prefill tok/s':>15}{'decode tok/s':>14}{'after prompt':>14}"
          f"{'of bound':>10}{'cosine':>9}{'top-1':>7}")
    ratios = {}
    for tier, peer_tier in TIERS.items():
        if tier not in args.tiers:
            continue
        for engine, path, label in (("ours", files["ours"][tier], tier), ("llamacpp", files["gguf"][peer_tier], peer_tier)):
            rs = runs[(engine, tier)]
            size = file_bytes(path)
            bound = bw / (size * active / total)
            decode = med(r["decode"] for r in rs)
            print(f"{tier:<6}{('ours ' + label) if engine == 'ours' else peer_tier:<11}{size / 1e6:>9.0f}"
                  f"{med(r['prefill'] for r in rs):>15.1f}{decode:>14.1f}{med(r['decode_after'] for r in rs):>14.1f}"
                  f"{decode / bound:>9.0%} {acc[label]['cosine_mean']:>9.4f}{acc[label]['top1_agreement']:>7.3f}")
        pairs = list(zip(runs[("ours", tier)], runs[("llamacpp", tier)]))
        ratio = {k: med(a[k] / b[k] for a, b in pairs) for k in ("prefill", "decode", "decode_after")}
        print(f"{'':<6}ours / llama.cpp: prefill {ratio['prefill']:.2f}x, decode {ratio['decode']:.2f}x, "
              f"decode after {args.prompt} {ratio['decode_after']:.2f}x")
        ratios[tier] = ratio["decode"]
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", type=Path, nargs="+",
                        default=[ROOT / "specs" / "bench-16e-8k.yaml", ROOT / "specs" / "bench-1b5.yaml"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repetitions", type=int, default=3,
                        help="runs per measurement within a round, averaged (llama-bench -r; the same for ours)")
    parser.add_argument("--int4-method", choices=["rtn", "gptq", "auto"], default="rtn",
                        help="our int4 codes (default rtn: the same rounding as Q4_0's)")
    parser.add_argument("--work", type=Path, default=cache_dir() / "vs")
    parser.add_argument("--rebuild", action="store_true", help="build ours again even if --work holds builds")
    parser.add_argument("--tiers", nargs="+", choices=list(TIERS), default=list(TIERS),
                        help="tiers to compare (default all; fp32 is always built: the same-tokens check and the "
                             "accuracy reference)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        os._exit(0)      # no interpreter teardown: llama.cpp's threads and ctypes objects need none
    import tempfile
    from l4compile.spec import load_spec
    peer = LlamaCpp.ensure()
    print(f"llama.cpp {LLAMA_CPP_COMMIT} (vendored in llama-cpp-python {VERSION}), {peer.bin}")
    ratios = {}
    for spec_path in args.specs:
        spec = load_spec(spec_path)
        args.vocab = spec.vocab_size
        files = prepare(spec_path, args.work / spec.name, peer, args.int4_method, args.rebuild, tuple(args.tiers))
        tokens = check_same_tokens(files, args, prompt_ids(spec.vocab_size, 32, 0))
        print(f"{spec.name}: ours fp32 and llama.cpp F32 continue a 32-token prompt with the same "
              f"{len(tokens)} greedy tokens", flush=True)
        with tempfile.TemporaryDirectory(prefix="l4vs-") as tmp:
            acc = accuracy(files, args, prompt_ids(spec.vocab_size, ACCURACY_TOKENS, 2), Path(tmp))
        runs, probes = speed(files, args)
        ratios = report(spec, files, acc, runs, probes, args)
    print("decode ours/llama.cpp: " + " ".join(f"{tier} {ratios[tier]:.2f}" for tier in TIERS if tier in ratios))


if __name__ == "__main__":
    main()
