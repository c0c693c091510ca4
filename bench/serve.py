"""Serving benchmark: continuous batching against one-at-a-time serving, with concurrent streaming clients.

specs/bench-16e.yaml (~118M parameters; its vocabulary cut to the tokenizer's) is built with random weights
and the Llama 4-style test tokenizer (tests/text/llama4_tokenizer.py), or `--build DIR` serves a build of
yours (with a tokenizer). Two real
`l4compile serve` processes run side by side: one with `--max-batch N` (continuous batching) and one with
`--max-batch 1` (one request at a time, the rest queued). In each round, for each server in turn, CLIENTS
streaming clients (the real openai client, one thread each) send at once prompts of different lengths
(greedy, `max_tokens` new tokens each). Per round and server: throughput (completion tokens of all
clients / wall time of the round), time to first token (p50, p95 over the clients: from sending the request
to its first text), and whether every client's text equals the other server's for the same prompt.
Prints medians over rounds, and the median of the per-round throughput ratios.

With `--in-process`, each round also submits the same requests straight to a Scheduler in the bench's
process (no HTTP, no clients), batched and one at a time: the scheduler's own gain.

    python bench/serve.py [--rounds 3] [--clients 16] [--max-batch 8] [--max-tokens 64] [--threads 2]
        [--context 512] [--build DIR] [--in-process]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TEXT = ("The capital of France is Paris, and the capital of Japan is Tokyo. Once upon a time there was a little "
        "compiler that lowered graphs, and said: Hello, how are you today? I am fine, thank you! ")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build(out: Path) -> Path:
    from l4compile.build import BuildOptions, build as build_spec
    from l4compile.spec import load_spec
    from l4compile.weights import RandomWeights
    from tests.text.llama4_tokenizer import model_vocab, save_tokenizer
    tokenizer = save_tokenizer(out / "tokenizer")
    # the model's vocabulary is the tokenizer's: every generated id has text (time to first token is real)
    spec = (ROOT / "specs" / "bench-16e.yaml").read_text().replace("vocab_size: 32000",
                                                                   f"vocab_size: {model_vocab(tokenizer)}")
    (out / "bench-16e.yaml").write_text(spec)
    build_spec(load_spec(out / "bench-16e.yaml"), out / "bench-16e", RandomWeights(0),
               BuildOptions(tokenizer=str(tokenizer)), log=lambda _: None)
    return out / "bench-16e"


def start(build_dir: Path, max_batch: int, threads: int, context: int, workdir: Path):
    from tests.serve.conftest import ServerProcess
    args = ["--max-batch", str(max_batch), "--max-queue", "256", "--threads", str(threads), "--context", str(context)]
    return ServerProcess(build_dir, *args, log=workdir / f"server-{max_batch}.log").start()


def one_client(client, prompt: str, max_tokens: int) -> tuple[str, int, float]:
    """(text, completion tokens, seconds to the first text)."""
    sent, first, text, tokens = time.perf_counter(), None, [], 0
    for chunk in client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].text:
            first = first or time.perf_counter() - sent
            text.append(chunk.choices[0].text)
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return "".join(text), tokens, first if first is not None else time.perf_counter() - sent


def load(server, prompts: list[str], max_tokens: int) -> dict:
    client = server.client()
    started = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: one_client(client, p, max_tokens), prompts))
    seconds = time.perf_counter() - started
    ttft = sorted(r[2] for r in results)
    return {"texts": [r[0] for r in results], "tokens": sum(r[1] for r in results), "seconds": seconds,
            "throughput": sum(r[1] for r in results) / seconds,
            "ttft_p50": statistics.median(ttft), "ttft_p95": ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))]}


def in_process(build_dir: Path, prompts: list[str], max_tokens: int, max_batch: int, threads: int,
               context: int) -> dict:
    """The same requests submitted straight to a Scheduler (no HTTP, no clients): the scheduler's own gain."""
    import threading

    from l4compile.runtime import Engine
    from l4compile.runtime.sampling import Sampling
    from l4compile.serve.scheduler import Finished, Request, Scheduler
    engine = Engine.load(build_dir, threads=threads)
    scheduler = Scheduler(engine, max_batch=max_batch, max_queue=len(prompts), context=context)
    stops = frozenset(engine.text_settings["stop_tokens"])
    done, tokens = [threading.Event() for _ in prompts], [0] * len(prompts)

    def sink(i: int):
        def receive(event) -> None:
            if not hasattr(event, "text"):
                tokens[i] = event.completion_tokens if isinstance(event, Finished) else 0
                done[i].set()
        return receive

    scheduler.start()
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        scheduler.submit(Request(engine.encode_prompt(prompt), max_tokens, Sampling(0.0), None, stops, (), sink(i)))
    for event in done:
        event.wait()
    seconds = time.perf_counter() - started
    scheduler.stop()
    return {"tokens": sum(tokens), "seconds": seconds, "throughput": sum(tokens) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=512, help="the servers' tokens per row")
    parser.add_argument("--build", type=Path, help="serve this build (with a tokenizer) instead of bench-16e")
    parser.add_argument("--in-process", action="store_true",
                        help="also run the same requests on a Scheduler in this process (no HTTP), each round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="l4compile-bench-serve-") as tmp:
        workdir = Path(tmp)
        if args.build is None:
            log("building bench-16e with random weights and the test tokenizer ...")
            args.build = build(workdir)
        from l4compile.runtime import Engine
        engine = Engine.load(args.build)
        words = engine.tokenizer.encode(TEXT * 40)
        longest = min(256, min(args.context, engine.max_context) - args.max_tokens - 8)
        lengths = [16 + ((longest - 16) * i) // max(1, args.clients - 1) for i in range(args.clients)]   # 16 .. 256
        prompts = [engine.tokenizer.decode(words[1:n]) for n in lengths]
        log(f"{args.clients} clients, prompts of {min(lengths)}-{max(lengths)} tokens, {args.max_tokens} new tokens "
            f"each; starting the servers (--max-batch {args.max_batch} and --max-batch 1) ...")
        servers = {"batched": start(args.build, args.max_batch, args.threads, args.context, workdir),
                   "one at a time": start(args.build, 1, args.threads, args.context, workdir)}
        rows: dict[str, list[dict]] = {name: [] for name in servers}
        same = True
        try:
            for r in range(args.rounds):
                texts = {}
                for name, server in servers.items():
                    result = load(server, prompts, args.max_tokens)
                    rows[name].append(result)
                    texts[name] = result["texts"]
                    log(f"round {r + 1}/{args.rounds} {name:>13}: {result['tokens']} tokens in "
                        f"{result['seconds']:.2f} s, {result['throughput']:.1f} tokens/s, time to first token p50 "
                        f"{result['ttft_p50']:.2f} s p95 {result['ttft_p95']:.2f} s")
                same &= texts["batched"] == texts["one at a time"]
                if args.in_process:
                    for name, batch in (("scheduler, batched", args.max_batch), ("scheduler, one at a time", 1)):
                        result = in_process(args.build, prompts, args.max_tokens, batch, args.threads, args.context)
                        rows.setdefault(name, []).append(result)
                        log(f"round {r + 1}/{args.rounds} {name} (no HTTP): {result['tokens']} tokens in "
                            f"{result['seconds']:.2f} s, {result['throughput']:.1f} tokens/s")
        finally:
            for server in servers.values():
                server.stop()

    def median(name: str, key: str) -> float:
        return statistics.median(row[key] for row in rows[name])

    ratio = statistics.median(b["throughput"] / o["throughput"] for b, o in zip(rows["batched"], rows["one at a time"]))
    print(f"\n{args.clients} concurrent streaming clients, prompts {min(lengths)}-{max(lengths)} tokens, "
          f"{args.max_tokens} new tokens each, {args.threads} threads, medians of {args.rounds} rounds\n")
    print("| serving | throughput (tokens/s, all clients) | time to first token p50 | p95 |")
    print("|---|---|---|---|")
    for name, label in (("batched", f"continuous batching (--max-batch {args.max_batch})"),
                        ("one at a time", "one at a time (--max-batch 1)")):
        print(f"| {label} | {median(name, 'throughput'):.1f} | {median(name, 'ttft_p50'):.2f} s | "
              f"{median(name, 'ttft_p95'):.2f} s |")
    print(f"\nthroughput ratio (median of per-round ratios): {ratio:.2f}x; "
          f"every client's text equal on both servers: {'yes' if same else 'NO'}")
    if args.in_process:
        alone = statistics.median(b["throughput"] / o["throughput"] for b, o in
                                  zip(rows["scheduler, batched"], rows["scheduler, one at a time"]))
        print(f"the scheduler alone (no HTTP): {median('scheduler, batched', 'throughput'):.1f} vs "
              f"{median('scheduler, one at a time', 'throughput'):.1f} tokens/s, ratio {alone:.2f}x")


if __name__ == "__main__":
    main()
