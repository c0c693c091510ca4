"""Text overhead benchmark: tokenization and streaming detokenization per generated token, against the model step.

specs/bench-16e.yaml (~118M parameters) is built with random weights and the Llama 4-style test
tokenizer (byte-level BPE with Llama 4's special tokens, tests/text/llama4_tokenizer.py). Measured
in one run, alternating in rounds:
  - the model's decode step (ms/token: `Engine.stream` on ids, 128 new tokens after a 128-token prompt);
  - the text work of one answer, alone: tokenizing the prompt plus the streaming detokenizer over 128
    tokens of real text (English, CJK, emoji), divided by 128: the cost `complete_stream` adds per token;
  - end to end, `complete_stream(text)` against `stream(ids)` for the same prompt (random weights emit ids
    the small tokenizer decodes to little, so this row is a sanity check; the row above is the measure);
  - a ragged batch: `generate_text` of 4 prompts of 32, 64, 96 and 128 tokens, 64 new tokens each, one
    `generate` call, against the same 4 prompts one by one (`complete`).
Prints medians over rounds; the text work must stay under 2% of the decode step.

    python bench/text.py [--rounds 5] [--threads 2]
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
NEW = 128
TEXT = ("The capital of France is Paris, and the capital of Japan is Tokyo (東京). Once upon a time there was "
        "a little compiler that lowered graphs 🚀 and said: 你好，世界！ Hello, how are you today? 👋🏽 ")


def build(out: Path) -> Path:
    from l4compile.build import BuildOptions, build as build_spec
    from l4compile.spec import load_spec
    from l4compile.weights import RandomWeights
    from tests.text.llama4_tokenizer import save_tokenizer
    tokenizer = save_tokenizer(out / "tokenizer")
    build_spec(load_spec(ROOT / "specs" / "bench-16e.yaml"), out / "build", RandomWeights(0),
               BuildOptions(tokenizer=str(tokenizer)), log=lambda _: None)
    return out / "build"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from l4compile.runtime import Engine
    with tempfile.TemporaryDirectory(prefix="l4compile-bench-text-") as tmp:
        engine = Engine.load(build(Path(tmp)), threads=args.threads)
        tokenizer = engine.tokenizer
        prompt = (TEXT * 8)[:600]
        prompt_ids = engine.encode_prompt(prompt)[:128]
        answer_ids = tokenizer.encode(TEXT * 4, add_special_tokens=False)[:NEW]
        assert len(answer_ids) == NEW
        greedy = dict(temperature=0.0, stop_tokens=())

        def decode_steps() -> float:
            """ms per decode step: the time between the first and the last of NEW tokens."""
            stamps = [time.perf_counter() for _ in engine.stream(prompt_ids, NEW, **greedy)]
            return (stamps[-1] - stamps[0]) / (len(stamps) - 1)

        def text_work() -> None:
            tokenizer.encode(prompt)
            decoder = tokenizer.stream_decoder()
            for token in answer_ids:
                decoder.step(token)
            decoder.finish()

        ragged_prompts = [engine.tokenizer.decode(engine.encode_prompt(TEXT * 8)[1:n]) for n in (32, 64, 96, 128)]

        def one_by_one() -> None:
            for p in ragged_prompts:
                engine.complete(p, 64, **greedy)

        steps, texts, ends, batches = [], [], [], []
        decode_steps()   # warm-up: session, caches
        for _ in range(args.rounds):
            steps.append(decode_steps())
            texts.append(min(timed(text_work) for _ in range(20)) / NEW)
            ids_time = timed(lambda: list(engine.stream(prompt_ids, NEW, **greedy)))
            text_time = timed(lambda: list(engine.complete_stream(prompt, NEW, **greedy)))
            ends.append(text_time / ids_time)
            batches.append(timed(one_by_one) / timed(lambda: engine.generate_text(ragged_prompts, 64, **greedy)))
        step, text = statistics.median(steps), statistics.median(texts)
        print(f"bench-16e, {args.threads} threads, {NEW} new tokens, {args.rounds} rounds (medians)")
        print(f"  model decode step                         {step * 1e3:8.3f} ms/token")
        print(f"  tokenize prompt + stream-detokenize        {text * 1e6:8.1f} us/token  "
              f"({100 * text / step:.3f}% of the decode step; limit 2%)")
        print(f"  complete_stream(text) / stream(ids), e2e   {statistics.median(ends):8.3f}x")
        print(f"  ragged batch of 4 (generate_text) vs one by one: {statistics.median(batches):.2f}x the throughput")


if __name__ == "__main__":
    main()
