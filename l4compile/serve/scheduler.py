"""The scheduler: one thread owns the running batch and its KV cache and steps the engine.

Requests wait in a bounded queue; between decode steps the scheduler admits them into free rows of
one batch cache (`max_batch` rows). A new row's prompt is prefilled one piece per iteration (a piece
never crosses a chunk of the chunked layers, `KVCache.pieces`), interleaved with decode steps of the
running rows, so a long prompt stalls the others by one piece at most. Each row keeps its own
position, sampling generator (seeded as `Engine.stream` seeds it, so a row's tokens equal that prompt
generated alone), stop tokens and strings, token limit and deadline; it leaves the batch when it is
done, cancelled (its client went away) or out of time, and its row is free for the next request.

Builds whose cache keeps one position for the whole batch (sequence-major: TensorRT and sharded builds)
serve one request at a time through the same loop (`batch_rows == 1`).

The HTTP layer (l4compile/serve/app.py) meets the scheduler at `submit`: it hands over token ids and
settings with a `sink` callable, and the scheduler calls the sink from its thread with `Piece`,
`Finished` and `Failed` events. Nothing here knows about HTTP.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from l4compile.runtime.sampling import Sampling
from l4compile.serve.metrics import Metrics
from l4compile.serve.text_output import TextOutput

DEFAULT_CONTEXT = 8192   # tokens per row unless asked otherwise (the model's own, where smaller)


@dataclass(frozen=True)
class Piece:
    """New text of a request (final: it never changes)."""
    text: str


@dataclass(frozen=True)
class Finished:
    reason: str               # "stop" (a stop token or string) or "length" (max_tokens, or the context)
    prompt_tokens: int
    completion_tokens: int    # every generated token, the stop token included


@dataclass(frozen=True)
class Failed:
    status: int               # the HTTP status it maps to (504 timeout, 503 shutting down, 500 internal)
    kind: str                 # "timeout", "unavailable", "internal_error"
    message: str


class QueueFull(Exception):
    """The queue holds max_queue requests already."""


class ShuttingDown(Exception):
    """The scheduler takes no new requests."""


@dataclass(eq=False)
class Request:
    """One generation: a prompt of token ids and how to continue it. `cancel()` may be called from any thread."""
    ids: np.ndarray                      # [seq] int64
    max_tokens: int
    sampling: Sampling
    seed: int | None
    stop_tokens: frozenset[int]
    stop_strings: tuple[str, ...]
    sink: Callable[[object], None]       # receives Piece / Finished / Failed, from the scheduler thread
    timeout: float | None = None         # seconds from submission
    image_features: np.ndarray | None = None
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def expired(self) -> bool:
        return self.timeout is not None and time.monotonic() - self.submitted > self.timeout


@dataclass(eq=False)
class Row:
    """A request in the batch: its row of the cache and its decoding state."""
    request: Request
    index: int
    output: TextOutput
    rng: np.random.Generator
    prefilled: int = 0                   # prompt tokens in the cache so far
    last: int = 0                        # the last token chosen (the next decode step's input)
    generated: int = 0

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.request.ids)


class Scheduler:
    """Owns the batch cache and the engine's steps; `start()` runs the loop in a daemon thread."""

    def __init__(self, engine, max_batch: int = 8, max_queue: int = 64, context: int | None = None,
                 prefill_chunk: int | None = None, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.in_place = bool((engine.manifest.kv_cache or {}).get("in_place"))
        self.batch_rows = max_batch if self.in_place else 1
        self.max_queue = max_queue
        self.context = min(context or DEFAULT_CONTEXT, engine.max_context)
        self.prefill_chunk = prefill_chunk
        self.metrics = metrics or Metrics()
        self.metrics.batch_rows = self.batch_rows
        self.tokenizer = engine.tokenizer
        self.cache = engine.new_cache(self.batch_rows, self.context)
        self._queue: collections.deque[Request] = collections.deque()
        self._rows: list[Row] = []
        self._lock = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._drain_deadline: float | None = None
        self._thread: threading.Thread | None = None

    # ---- the HTTP side ---------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue a request, or raise QueueFull / ShuttingDown."""
        with self._lock:
            if not self._accepting:
                raise ShuttingDown()
            if len(self._queue) >= self.max_queue:
                raise QueueFull()
            self._queue.append(request)
            self.metrics.queue_depth = len(self._queue)
            self._lock.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="l4compile-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Take no new requests; requests still queued or running get a clean `Failed` (503); wait for the thread."""
        with self._lock:
            self._accepting = False
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def drain(self, grace: float) -> None:
        """Take no new requests (ShuttingDown); those queued or running get `grace` seconds to finish, then a
        clean `Failed` (503). Safe to call from a signal handler."""
        self._accepting = False
        self._drain_deadline = time.monotonic() + grace

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active_rows(self) -> int:
        return len(self._rows)

    # ---- the loop ----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._queue and not self._rows:
                    self._lock.wait()
                if self._stopping:
                    break
            try:
                self._drop_finished()
                self._admit()
                self._prefill_piece()
                self._decode_step()
            except Exception as exc:   # a fault outside any one request's step: answer the batch, never hang
                for row in list(self._rows):
                    self._fail(row.request, _internal(exc), row)
        self._fail_all()

    def _fail_all(self) -> None:
        """Shutting down: every running and queued request gets a clean 503."""
        shutting_down = Failed(503, "unavailable", "the server is shutting down")
        for row in list(self._rows):
            self._fail(row.request, shutting_down, row)
        with self._lock:
            queued, self._queue = list(self._queue), collections.deque()
        for request in queued:
            self._fail(request, shutting_down)
        self._update_gauges()

    def _drop_finished(self) -> None:
        """Rows whose client went away or whose time is up leave the batch; so do such queued requests."""
        if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
            self._fail_all()
        for row in list(self._rows):
            if row.request.cancelled:
                self._release(row)
                self.metrics.count("cancelled")
            elif row.request.expired:
                self._fail(row.request, _timeout(row.request), row)
        with self._lock:
            waiting = list(self._queue)
        for request in waiting:
            if request.cancelled or request.expired:
                with self._lock:
                    self._queue.remove(request)
                if request.cancelled:
                    self.metrics.count("cancelled")
                else:
                    self._fail(request, _timeout(request))

    def _admit(self) -> None:
        free = sorted(set(range(self.batch_rows)) - {row.index for row in self._rows})
        while free:
            with self._lock:
                if not self._queue:
                    break
                request = self._queue.popleft()
            index = free.pop(0)
            self.cache.lengths[index] = 0
            self._rows.append(Row(request, index, TextOutput(self.tokenizer, request.stop_strings),
                                  np.random.default_rng(request.seed)))
        self._update_gauges()

    def _row_cache(self, row: Row):
        return self.cache.row(row.index) if self.in_place else self.cache

    def _prefill_piece(self) -> None:
        """The next piece of the oldest row still in prefill; its last piece gives the row's first token."""
        row = next((r for r in self._rows if not r.decoding), None)
        if row is None:
            return
        ids, cache = row.request.ids, self._row_cache(row)
        remaining = len(ids) - row.prefilled
        if self.in_place:
            size = cache.pieces(remaining)[0]
            size = min(size, self.prefill_chunk) if self.prefill_chunk else size
        else:   # sequence-major builds: one prefill, as Engine runs it (their rows run one at a time anyway)
            size = remaining
        last = row.prefilled + size == len(ids)
        try:
            logits = self.engine.step(ids[None, row.prefilled:row.prefilled + size], cache,
                                      logits_start=size - 1 if last else size,
                                      image_features=self._piece_features(row, size))
        except Exception as exc:   # this request's failure is its own
            self._fail(row.request, _internal(exc), row)
            return
        row.prefilled += size
        self.metrics.prompt_tokens += size
        if last:
            self._advance([row], logits[:, -1])

    def _piece_features(self, row: Row, size: int) -> np.ndarray | None:
        """The image features of the image tokens in the row's next `size` prompt tokens (in order)."""
        features = row.request.image_features
        if features is None or self.engine.vision is None:
            return None
        image_token, ids = self.engine.vision.image_token, row.request.ids
        done = int((ids[:row.prefilled] == image_token).sum())
        return features[done:done + int((ids[row.prefilled:row.prefilled + size] == image_token).sum())]

    def _decode_step(self) -> None:
        """One token for every row past its prefill (rows in prefill or free are stepped and rewound)."""
        rows = [row for row in self._rows if row.decoding and row.generated]
        if not rows:
            return
        if not self.in_place:
            view, top = self.cache, 1
        else:
            top = max(row.index for row in rows) + 1
            view = self.cache.rows(0, top)
        before = view.lengths.copy()
        tokens = np.zeros((top, 1), dtype=np.int64)
        for row in rows:
            tokens[row.index, 0] = row.last
        try:
            logits = self.engine.step(tokens, view, logits_start=0)[:, -1]
        except Exception:   # find the row at fault: step each alone
            view.lengths[:] = before
            for row in rows:
                try:
                    self._advance([row], self.engine.step(tokens[row.index:row.index + 1], self._row_cache(row),
                                                          logits_start=0)[:, -1])
                except Exception as exc:
                    self._fail(row.request, _internal(exc), row)
            return
        stepped = {row.index for row in rows}
        for b in range(top):
            if b not in stepped:   # a row in prefill (or a free one) keeps its position
                view.lengths[b] = before[b]
        self.metrics.decode_steps += 1
        self._advance(rows, logits[[row.index for row in rows]] if self.in_place else logits)

    def _advance(self, rows: list[Row], logits: np.ndarray) -> None:
        """Choose each row's next token (logits [len(rows), vocab]) and hand its text to the client."""
        for row, row_logits in zip(rows, logits):
            request = row.request
            try:
                token = int(request.sampling.choose(row_logits[None], row.rng)[0])
                row.last, row.generated = token, row.generated + 1
                self.metrics.add_tokens(1)
                if token in request.stop_tokens:
                    self._finish(row, "stop", row.output.finish())
                    continue
                piece, stopped = row.output.add(token)
                if stopped:
                    self._finish(row, "stop", piece)
                elif row.generated >= request.max_tokens:
                    self._finish(row, "length", piece + row.output.finish())
                elif piece:
                    request.sink(Piece(piece))
            except Exception as exc:
                self._fail(request, _internal(exc), row)

    # ---- leaving the batch ---------------------------------------------------------
    def _finish(self, row: Row, reason: str, text: str) -> None:
        request = row.request
        self._release(row)
        if text:
            request.sink(Piece(text))
        request.sink(Finished(reason, len(request.ids), row.generated))
        self.metrics.count("finished")

    def _fail(self, request: Request, failure: Failed, row: Row | None = None) -> None:
        if row is not None:
            self._release(row)
        self.metrics.count(failure.kind)
        try:
            request.sink(failure)
        except Exception:   # the client is gone already
            pass

    def _release(self, row: Row) -> None:
        if row in self._rows:
            self._rows.remove(row)
            self.cache.lengths[row.index] = 0
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.queue_depth = len(self._queue)
        self.metrics.active_rows = len(self._rows)


def _timeout(request: Request) -> Failed:
    return Failed(504, "timeout", f"the request took longer than its {request.timeout:g} s timeout")


def _internal(exc: Exception) -> Failed:
    return Failed(500, "internal_error", f"generation failed: {type(exc).__name__}: {exc}")
