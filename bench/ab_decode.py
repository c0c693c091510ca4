"""Decode speed of two builds, A/B: each build in its own process (both loaded for the whole run), decode
measurements alternating between them (A first in even rounds, B first in odd ones), medians of the
per-round ratios. On a host whose speed drifts within minutes, this compares two builds (a compiler or
quantization change) far more tightly than two separate benchmark runs.

    python bench/ab_decode.py BUILD_A BUILD_B [--steps 64] [--rounds 11] [--context 0] [--threads 2]

Each measurement: a fresh cache (prefilled with --context tokens, untimed), one untimed step, then
--steps single-token steps; tok/s. Last line: `B/A decode: R (rounds' range LO-HI)`.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from pathlib import Path


def worker(build: str, threads: int, steps: int, context: int, conn) -> None:
    import numpy as np
    from l4compile.runtime import Engine
    from l4compile.runtime.errors import BuildDirError
    try:
        engine = Engine.load(Path(build), threads=threads)
    except BuildDirError as exc:   # the one line, for the parent to print
        conn.send(str(exc))
        return
    conn.send("ready")
    ids = np.arange(3, 3 + max(context, 1), dtype=np.int64)[None]
    token = np.array([[5]], dtype=np.int64)
    while conn.recv() == "run":
        cache = engine.new_cache(1, context + steps + 2)
        if context:
            engine.step(ids, cache, logits_start=context - 1)
        engine.step(token, cache, logits_start=0)
        start = time.perf_counter()
        for _ in range(steps):
            engine.step(token, cache, logits_start=0)
        conn.send(steps / (time.perf_counter() - start))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--context", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    workers = []
    for label, build in (("A", args.a), ("B", args.b)):
        print(f"loading {label}: {build}", flush=True)
        mine, theirs = ctx.Pipe()
        process = ctx.Process(target=worker, args=(build, args.threads, args.steps, args.context, theirs))
        process.start()
        answer = mine.recv() if mine.poll(600) else f"{build}: not loaded within 600 s"
        if answer != "ready":
            for started, _ in workers + [(process, mine)]:
                started.terminate()
            raise SystemExit(f"ab_decode: {answer}")
        workers.append((process, mine))
    rates: list[tuple[float, float]] = []
    try:
        for r in range(args.rounds):
            got = {}
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                workers[i][1].send("run")
                got[i] = workers[i][1].recv()
            rates.append((got[0], got[1]))
            print(f"  round {r + 1}/{args.rounds}: A {got[0]:.1f} tok/s, B {got[1]:.1f} tok/s, B/A {got[1] / got[0]:.3f}",
                  flush=True)
    finally:
        for process, conn in workers:
            conn.send("stop")
            process.join(60)
    ratios = [b / a for a, b in rates]
    print(f"A {statistics.median(a for a, _ in rates):.1f} tok/s, B {statistics.median(b for _, b in rates):.1f} "
          f"tok/s (medians; {args.rounds} rounds of {args.steps} steps after {args.context} cached, "
          f"{args.threads} threads)")
    print(f"B/A decode: {statistics.median(ratios):.3f} (rounds' range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
