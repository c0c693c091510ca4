"""Server metrics in Prometheus' text exposition format (no client library: a handful of numbers)."""

from __future__ import annotations

import collections
import threading
import time

TOKENS_PER_SECOND_WINDOW = 10.0   # seconds of recent steps the tokens/s gauge averages


class Metrics:
    """Counters and gauges the scheduler and the HTTP layer update; `render()` is the /metrics body."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()   # (endpoint, status)
        self.outcomes: collections.Counter[str] = collections.Counter()   # finished, cancelled, timeout, ...
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.decode_steps = 0
        self.queue_depth = 0
        self.active_rows = 0
        self.batch_rows = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def count(self, outcome: str) -> None:
        with self._lock:
            self.outcomes[outcome] += 1

    def add_tokens(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.generated_tokens += n
            self._recent.append((now, n))
            while self._recent and self._recent[0][0] < now - TOKENS_PER_SECOND_WINDOW:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            recent = sum(n for t, n in self._recent if t >= now - TOKENS_PER_SECOND_WINDOW)
        return recent / max(1e-9, min(TOKENS_PER_SECOND_WINDOW, now - self.started))

    def render(self) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP l4compile_{name} {help_}", f"# TYPE l4compile_{name} {kind}"])
            lines.extend(f"l4compile_{name}{labels} {value:g}" for labels, value in samples)

        with self._lock:
            requests = sorted(self.requests.items())
            outcomes = sorted(self.outcomes.items())
        metric("requests_total", "counter", "HTTP requests by endpoint and status code",
               [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in requests])
        metric("generations_total", "counter", "generations by outcome (finished, cancelled, timeout, ...)",
               [(f'{{outcome="{o}"}}', n) for o, n in outcomes])
        metric("prompt_tokens_total", "counter", "prompt tokens prefilled", [("", self.prompt_tokens)])
        metric("generated_tokens_total", "counter", "tokens generated", [("", self.generated_tokens)])
        metric("tokens_per_second", "gauge", f"tokens generated per second over the last "
               f"{TOKENS_PER_SECOND_WINDOW:g} s", [("", self.tokens_per_second())])
        metric("decode_steps_total", "counter", "batched decode steps", [("", self.decode_steps)])
        metric("queue_depth", "gauge", "requests waiting for a batch row", [("", self.queue_depth)])
        metric("batch_rows_active", "gauge", "batch rows holding a request", [("", self.active_rows)])
        metric("batch_rows", "gauge", "batch rows (max batch)", [("", self.batch_rows)])
        metric("batch_occupancy", "gauge", "active rows / batch rows",
               [("", self.active_rows / self.batch_rows if self.batch_rows else 0.0)])
        return "\n".join(lines) + "\n"
