"""The scheduler without HTTP: a request's failure or timeout is its own, shutdown answers everyone."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from l4compile.runtime.sampling import Sampling
from l4compile.serve.scheduler import Failed, Finished, Piece, Request, Scheduler, ShuttingDown

pytestmark = pytest.mark.slow
WAIT = 120   # seconds a test waits for an answer at most


class Collector:
    """A request's sink: keeps its events, says when the last one came."""

    def __init__(self) -> None:
        self.events: list = []
        self.done = threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if not isinstance(event, Piece):
            self.done.set()

    def result(self):
        assert self.done.wait(WAIT)
        return "".join(e.text for e in self.events if isinstance(e, Piece)), self.events[-1]


def request(engine, prompt: str, max_tokens: int = 12, **kwargs) -> tuple[Request, Collector]:
    sink = Collector()
    stops = frozenset(engine.text_settings["stop_tokens"])
    return Request(engine.encode_prompt(prompt), max_tokens, Sampling(0.0), None, stops, (), sink, **kwargs), sink


@pytest.fixture
def scheduler(engine):
    scheduler = Scheduler(engine, max_batch=2, max_queue=8)
    scheduler.start()
    yield scheduler
    scheduler.stop()


def test_a_failing_request_leaves_the_others_alone(engine, scheduler):
    good = [request(engine, p) for p in ("Hello, how are", "The capital of France")]
    bad, bad_sink = request(engine, "Once upon a time")
    bad.ids = np.array([1, engine.vocab_size + 5], np.int64)   # past the vocabulary: onnxruntime's Gather raises
    gone, _ = request(engine, "Emoji: ")
    gone.sink = lambda event: (_ for _ in ()).throw(RuntimeError("the event loop is closed"))   # a client gone
    for r, _ in [good[0], (bad, bad_sink), (gone, None), good[1]]:
        scheduler.submit(r)
    for (r, sink), prompt in zip(good, ("Hello, how are", "The capital of France")):
        text, last = sink.result()
        assert text == engine.complete(prompt, 12, temperature=0.0) and isinstance(last, Finished)
    text, last = bad_sink.result()
    assert isinstance(last, Failed) and last.status == 500 and last.kind == "internal_error"
    follow, sink = request(engine, "Hello")
    scheduler.submit(follow)
    assert sink.result()[0] == engine.complete("Hello", 12, temperature=0.0)
    assert scheduler.active_rows == 0 and scheduler.queue_depth == 0


def test_a_request_past_its_timeout_gets_504(engine, scheduler):
    late, sink = request(engine, "Hello", timeout=0.0)
    scheduler.submit(late)
    assert sink.result()[1] == Failed(504, "timeout", "the request took longer than its 0 s timeout")


def test_drain_answers_running_and_queued_requests_and_refuses_new_ones(engine, scheduler):
    pending = [request(engine, "The capital of France is", 200) for _ in range(4)]   # 2 rows run, 2 wait
    for r, _ in pending:
        scheduler.submit(r)
    scheduler.drain(0.0)
    with pytest.raises(ShuttingDown):
        scheduler.submit(request(engine, "Hello")[0])
    for _, sink in pending:
        last = sink.result()[1]
        assert isinstance(last, Finished) or last == Failed(503, "unavailable", "the server is shutting down")


def test_a_sequence_major_build_serves_one_request_at_a_time(text_checkpoint, tmp_path):
    """A trt build (one position for the whole batch) serves its rows one after another, with the same texts."""
    from l4compile.build import BuildOptions, build
    from l4compile.hf import HFCheckpoint, load_hf_config, spec_from_hf_config
    from l4compile.runtime import Engine
    from l4compile.tokenizer_files import tokenizer_source
    config, file = load_hf_config(text_checkpoint)
    spec = spec_from_hf_config(config, "tiny-text", str(file))
    build(spec, tmp_path / "trt", HFCheckpoint.for_spec(text_checkpoint, spec),
          BuildOptions(target="trt", tokenizer=tokenizer_source(None, str(text_checkpoint))), log=lambda _: None)
    engine = Engine.load(tmp_path / "trt", backend="onnxruntime")
    scheduler = Scheduler(engine, max_batch=4, max_queue=8)
    assert not scheduler.in_place and scheduler.batch_rows == 1
    scheduler.start()
    try:
        prompts = ("Hello, how are", "The capital of France is Paris. The capital of Japan", "Emoji: ")
        pending = [request(engine, p) for p in prompts]
        for r, _ in pending:
            scheduler.submit(r)
        for (_, sink), prompt in zip(pending, prompts):
            assert sink.result()[0] == engine.complete(prompt, 12, temperature=0.0)
    finally:
        scheduler.stop()


def test_a_long_prompt_is_prefilled_between_decode_steps(engine, scheduler):
    """While a long prompt is prefilled piece by piece (one chunk of 8 tokens per iteration), the running row
    keeps decoding: one step per piece, not one step for the whole prefill."""
    # The running row asks for more tokens than it can make while the long prompt is prefilled, however fast
    # the machine (200 were done before the prompt came on an idle one), and is cancelled at the end.
    running, running_sink = request(engine, "The capital of France is", 3000)
    scheduler.submit(running)
    for _ in range(WAIT * 200):   # bounded: until the running row is decoding (its text may be held back)
        if scheduler.metrics.decode_steps or running_sink.done.is_set():
            break
        running_sink.done.wait(0.005)
    assert not running_sink.done.is_set()
    long_prompt = "The capital of France is Paris. The capital of Japan is Tokyo. " * 3
    steps_at_first_token = []
    late, late_sink = request(engine, long_prompt, 4)
    late.sink = lambda event: (steps_at_first_token.append(scheduler.metrics.decode_steps)
                               if not late_sink.events else None, late_sink(event))
    pieces = -(-len(late.ids) // 8)
    steps = scheduler.metrics.decode_steps
    scheduler.submit(late)
    assert late_sink.result()[0] == engine.complete(long_prompt, 4, temperature=0.0)
    assert pieces >= 5 and steps_at_first_token[0] - steps >= pieces - 1
    assert not running_sink.done.is_set()   # the running row was decoding all along
    running.cancel()
