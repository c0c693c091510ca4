"""Progress of long work on stderr: named phases with their times; counted work with rate and time left.

    from l4compile.progress import current

    with current().phase("write weights", total=len(tensors), unit="tensor", size_total=nbytes) as task:
        for tensor in tensors:
            ...
            task.advance(1, size=tensor.nbytes, item=tensor.name)
    current().warn("...")      # shown unless --quiet, and kept for the --json report's "warnings"

Library code reports to `current()`, which is silent unless a caller activated a reporter: tests,
benchmarks and apps see nothing unless they ask. The CLI activates one per command
(`Progress.from_args`, with `add_progress_args`' -q/-v) and prints `report()` in its --json output.

On a terminal, a running phase is a tqdm bar (count, rate, time left) that disappears when the phase
ends. Elsewhere (CI logs, pipes) it is a start line and a status line at most every `interval`
seconds; lines of a command's first `interval` seconds are held, so a quick command prints its
phases once, at the end, and a quick failure prints only its error. Either way a finished phase
leaves one line with its time and amounts, and `finish` prints the total. Updates cost a clock read:
`advance` draws at most once per `interval` (env L4COMPILE_PROGRESS_INTERVAL, seconds; default 0.5
on a terminal, 5 elsewhere). Nothing is ever written to stdout.
"""

from __future__ import annotations

import contextvars
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, Iterator

QUIET, NORMAL, VERBOSE = 0, 1, 2
INTERVAL_ENV = "L4COMPILE_PROGRESS_INTERVAL"
TERMINAL_INTERVAL, PLAIN_INTERVAL = 0.5, 5.0
UNSIZED_TERMINAL = (80, 24)   # columns, rows


@dataclass
class PhaseRecord:
    """A phase as the --json report gives it: name, seconds, and the amounts it counted."""

    name: str
    within: str | None = None          # the enclosing phase
    seconds: float | None = None       # None while running
    count: int = 0
    unit: str | None = None
    size: float = 0
    size_unit: str | None = None
    failed: bool = False

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "seconds": round(self.seconds or 0.0, 6)}
        if self.within:
            data["within"] = self.within
        if self.unit:
            data.update(count=self.count, unit=self.unit)
        if self.size_unit:
            data.update(size=self.size, size_unit=self.size_unit)
        if self.failed:
            data["failed"] = True
        return data


class Task:
    """A running phase (what `Progress.phase` returns): `advance` it, then leave its `with` block
    (or call `finish`). Counts `unit`s toward `total` and, optionally, a size in `size_unit` toward
    `size_total` (bytes "B", tokens, ...); time left comes from the size where it has a total."""

    def __init__(self, progress: Progress, record: PhaseRecord, depth: int, total: int | None,
                 size_total: float | None, summary: bool, live: bool) -> None:
        self.progress, self.record, self.depth = progress, record, depth
        self.total, self.size_total = total, size_total
        self.summary, self.live = summary, live
        self.item: str | None = None
        self.comment = ""                 # appended to the phase's end line
        self.start = time.monotonic()
        self.last_draw = self.start
        self.bar: Any = None
        self.ticked = False               # the ticker drew the bar (tqdm does not know: see Progress._finish)
        self.start_line: str | None = None
        self.parts: dict[str, PhaseRecord] = {}   # Progress.part's records within this phase
        self.done = False

    @property
    def count(self) -> int:
        return self.record.count

    @property
    def size(self) -> float:
        return self.record.size

    def advance(self, n: int = 1, size: float = 0, item: str | None = None) -> None:
        """`n` more units done (and `size` more of the size); `item` names the last one (shown with -v)."""
        self.record.count += n
        self.record.size += size
        self.item = item
        if self.bar is not None:
            now = time.monotonic()
            if now - self.last_draw >= self.progress.interval:   # the postfix first: the update may draw
                self.last_draw = now
                self.bar.set_postfix_str(self._secondary(), refresh=False)
            self.bar.update(size if self.size_total else n)
        elif self.live and self.progress.plain and not self._complete():
            now = time.monotonic()
            if now - self.last_draw >= self.progress.interval:
                self.last_draw = now
                self.progress._line(self.status_line())

    def _complete(self) -> bool:
        """All counted (its end line follows at once: no status line)."""
        return (self.total is not None and self.count >= self.total) or \
            (bool(self.size_total) and self.size >= (self.size_total or 0))

    def set_total(self, total: int | None = None, size_total: float | None = None) -> None:
        self.total = total if total is not None else self.total
        self.size_total = size_total if size_total is not None else self.size_total
        if self.bar is not None:
            self.bar.total = self.size_total or self.total
            self.bar.refresh()

    def finish(self, failed: bool = False) -> None:
        self.progress._finish(self, failed)

    def __enter__(self) -> Task:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.finish(failed=kind is not None)

    # ---- text ----

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def amounts(self, totals: bool = True) -> str:
        """'12/123 tensors, 420.00 MB of 1.20 GB' (without totals: '12 tensors, 420.00 MB')."""
        parts = []
        if self.record.unit:
            parts.append(_count(self.count, self.total if totals else None, self.record.unit))
        if self.record.size_unit:
            parts.append(_count(self.size, self.size_total if totals else None, self.record.size_unit))
        return ", ".join(parts)

    def rates(self) -> str:
        seconds = self.elapsed()
        if seconds <= 0:
            return ""
        parts = [_rate(self.count / seconds, self.record.unit)] if self.record.unit and self.count else []
        if self.record.size_unit and self.size:
            parts.append(_rate(self.size / seconds, self.record.size_unit))
        return ", ".join(parts)

    def left(self) -> float | None:
        """Seconds left at the average rate so far (None before any progress or without a total)."""
        done, total = (self.size, self.size_total) if self.size_total else (self.count, self.total)
        if not total or not done:
            return None
        return max(self.elapsed() * (total - done) / done, 0.0)

    def status_line(self) -> str:
        bits = [b for b in (self.amounts(), self.rates()) if b]
        left = self.left()
        bits.append(f"{format_seconds(self.elapsed())} elapsed" + (f", about {format_seconds(left)} left"
                                                                   if left is not None else ""))
        if self.item and self.progress.verbosity >= VERBOSE:
            bits.append(self.item)
        return f"{'  ' * self.depth}{self.record.name}: {', '.join(bits)}"

    def end_line(self) -> str:
        bits = [b for b in (self.amounts(totals=False), self.rates(), self.comment) if b]
        return _end_line(self.record, self.depth, bits)

    def part_lines(self) -> list[str]:
        """The end lines of this phase's parts (one level deeper)."""
        lines = []
        for record in self.parts.values():
            rate = _rate(record.count / record.seconds, record.unit) if record.seconds and record.unit else ""
            bits = [b for b in (format_amount(record.count, record.unit) if record.unit else "", rate) if b]
            lines.append(_end_line(record, self.depth + 1, bits))
        return lines

    def _secondary(self) -> str:
        """The bar's postfix: the count when the bar shows the size, the size when it shows the count."""
        if self.size_total and self.record.unit:
            return _count(self.count, self.total, self.record.unit)
        if self.record.size_unit and self.size:
            return ", ".join(b for b in (_count(self.size, None, self.record.size_unit),
                                         self.rates().split(", ")[-1]) if b)
        return ""


class Progress:
    """Reports phases, notes and warnings of one command (see the module docstring)."""

    def __init__(self, stream: IO[str] | None = None, verbosity: int = NORMAL, interactive: bool | None = None,
                 interval: float | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.verbosity = verbosity
        self.interactive = _isatty(self.stream) if interactive is None else interactive
        self.plain = verbosity > QUIET and not self.interactive
        if interval is None:
            interval = _env_interval()
        self.interval = interval if interval is not None else (TERMINAL_INTERVAL if self.interactive
                                                               else PLAIN_INTERVAL)
        self.phases: list[PhaseRecord] = []
        self.warnings: list[str] = []
        self.start = time.monotonic()
        self._open: list[Task] = []
        self._held: list[str] | None = [] if self.plain else None   # lines of the first `interval` seconds
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    @classmethod
    def silent(cls) -> Progress:
        """Records phases, prints nothing."""
        return cls(stream=_NullStream(), verbosity=QUIET, interactive=False)

    @classmethod
    def from_args(cls, args: Any, stream: IO[str] | None = None) -> Progress:
        """From `add_progress_args`' --quiet / --verbose (either may be absent)."""
        verbosity = QUIET if getattr(args, "quiet", False) else VERBOSE if getattr(args, "verbose", False) else NORMAL
        return cls(stream=stream, verbosity=verbosity)

    # ---- the API long work uses ----

    def phase(self, name: str, total: int | None = None, unit: str | None = None, size_total: float | None = None,
              size_unit: str | None = None, detail: str = "", summary: bool = True, live: bool = True) -> Task:
        """Start a phase (a context manager; nested phases are shown indented). `unit` names what is
        counted ("tensor": shown as "tensors" and "tensors/s"); `size_unit` a second quantity ("B"
        for bytes, "token"). `detail` is said when it starts. `summary=False`: its end line only with
        -v. `live=False`: no bar or status lines while it runs (its output would share a terminal with
        stdout's), only its end line."""
        size_unit = size_unit or ("B" if size_total is not None else None)
        with self._lock:
            within = self._open[-1].record.name if self._open else None
            record = PhaseRecord(name, within, unit=unit, size_unit=size_unit)
            task = Task(self, record, len(self._open), total, size_total, summary, live)
            self.phases.append(record)
            self._open.append(task)
            if self.verbosity > QUIET and live:
                if self.interactive:
                    task.bar = self._bar(task)
                else:
                    amounts = ", ".join(_count(t, None, u) for t, u in ((total, unit), (size_total, size_unit))
                                        if t is not None and u)
                    task.start_line = f"{'  ' * task.depth}{name} ..." + \
                        "".join(f" {b}" for b in (amounts, detail) if b)
                    self._line(task.start_line)
            self._ensure_ticker()
        return task

    @contextmanager
    def part(self, name: str, unit: str | None = None) -> Iterator[None]:
        """Time spent in `name` inside the innermost running phase, summed over many stretches (each tensor
        quantized as it is written): one record "within" that phase, counting the stretches in `unit`s,
        whose line comes before the phase's own end line."""
        task = self._open[-1] if self._open else None
        start = time.monotonic()
        try:
            yield
        finally:
            if task is not None and not task.done:
                with self._lock:
                    record = task.parts.get(name)
                    if record is None:
                        record = task.parts[name] = PhaseRecord(name, task.record.name, 0.0, unit=unit)
                        self.phases.append(record)
                    record.seconds = (record.seconds or 0.0) + time.monotonic() - start
                    record.count += 1

    def note(self, message: str) -> None:
        """A line at normal verbosity (not with --quiet)."""
        if self.verbosity >= NORMAL:
            self._line(message)

    def detail(self, message: str) -> None:
        """A line with -v only."""
        if self.verbosity >= VERBOSE:
            self._line(message)

    def warn(self, message: str) -> None:
        """A line unless --quiet, kept in `warnings` for the --json report."""
        self.warnings.append(message)
        self.note(f"warning: {message}")

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def report(self) -> dict[str, Any]:
        """What every --json report carries: phases in start order, warnings, total seconds."""
        return {"phases": [r.to_dict() for r in self.phases], "warnings": list(self.warnings),
                "seconds": round(self.elapsed(), 6)}

    def finish(self, what: str) -> None:
        """After a command succeeded: the held lines, then '{what} finished in ...'."""
        self._close_open(failed=False)
        self.note(f"{what} finished in {format_seconds(self.elapsed())}")
        self._flush()

    def flush(self) -> None:
        """Print the held lines now: a command that goes on after its long start-up (a server, a chat) shows
        what the start-up took before it starts serving."""
        self._flush()

    @property
    def shares_stdout(self) -> bool:
        """Whether this reporter's stream and stdout are the same file or terminal (so a bar or status
        line would land inside stdout's output)."""
        try:
            a, b = os.fstat(self.stream.fileno()), os.fstat(sys.stdout.fileno())
        except (AttributeError, OSError, ValueError):
            return False
        return (a.st_dev, a.st_ino, a.st_rdev) == (b.st_dev, b.st_ino, b.st_rdev)

    @contextmanager
    def activate(self) -> Iterator[Progress]:
        """Make this the reporter `current()` returns; on leaving, open phases end (and on an error the
        held lines are dropped: the error is what the user needs to see)."""
        token = _CURRENT.set(self)
        try:
            yield self
        except BaseException:
            self._close_open(failed=True)
            raise
        finally:
            self._stop.set()
            if self._ticker is not None:
                self._ticker.join()
            self._ticker, self._stop = None, threading.Event()
            _CURRENT.reset(token)

    # ---- drawing ----

    def _bar(self, task: Task) -> Any:
        from tqdm import tqdm
        record = task.record
        if task.size_total:
            unit, total = (" " + _plural(record.size_unit) if record.size_unit != "B" else "B"), task.size_total
        elif record.unit:
            unit, total = " " + _plural(record.unit), task.total
        else:
            unit, total = "", None
        if not (record.unit or record.size_unit):
            bar_format = "{desc} ... {elapsed}"
        elif total:       # tqdm's own format, with the rate always as units per second
            bar_format = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, " \
                         "{rate_noinv_fmt}{postfix}]"
        else:
            bar_format = "{desc}: {n_fmt}{unit} [{elapsed}, {rate_noinv_fmt}{postfix}]"
        # A terminal that does not give its size (0 x 0: `script`, some containers and CI consoles) would get
        # nothing from tqdm: such a terminal gets a fixed one.
        sized = _terminal_columns(self.stream) > 0
        return tqdm(total=total, desc=f"{'  ' * task.depth}{record.name}", unit=unit, unit_scale=bool(task.size_total),
                    leave=False, file=self.stream, mininterval=self.interval, delay=self.interval,
                    dynamic_ncols=sized, ncols=None if sized else UNSIZED_TERMINAL[0],
                    nrows=None if sized else UNSIZED_TERMINAL[1], bar_format=bar_format)

    def _line(self, text: str) -> None:
        with self._lock:
            if self._held is not None:
                if time.monotonic() - self.start < self.interval:
                    self._held.append(text)
                    return
                self._flush()
            self._write(text)

    def _flush(self) -> None:
        with self._lock:
            held, self._held = self._held, None
            for text in held or ():
                self._write(text)

    def _write(self, text: str) -> None:
        if any(t.bar is not None for t in self._open):
            from tqdm import tqdm
            tqdm.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def _finish(self, task: Task, failed: bool) -> None:
        with self._lock:
            if task.done:
                return
            task.done = True
            task.record.seconds = task.elapsed()
            task.record.failed = failed
            if task in self._open:
                self._open.remove(task)
            if task.bar is not None:
                if task.ticked:     # tqdm clears only a bar it drew itself (by update, not by our refresh)
                    task.bar.clear()
                task.bar.close()
                task.bar = None
            if self.verbosity == QUIET or (failed and not self.plain):
                return   # a failure on a terminal: the error line that follows says it
            if self._held is not None and task.start_line in self._held:
                self._held.remove(task.start_line)     # held, never shown: the end line says it all
            if task.summary or self.verbosity >= VERBOSE:
                for line in task.part_lines():
                    self._line(line)
                self._line(task.end_line())

    def _close_open(self, failed: bool) -> None:
        for task in reversed(list(self._open)):
            task.finish(failed)
        if failed:
            self._held = None

    def _ensure_ticker(self) -> None:
        """A daemon thread that keeps a quiet phase visible: a terminal bar's clock ticks, and a plain
        status line appears every `interval` seconds of a phase that reports nothing."""
        if self.verbosity == QUIET or self._ticker is not None:
            return
        self._ticker = threading.Thread(target=self._tick, name="l4compile-progress", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        period = self._tick_period()
        while not self._stop.wait(period):
            self._tick_once()

    def _tick_period(self) -> float:
        return max(self.interval, 0.5)

    def _tick_once(self) -> None:
        """One tick of the ticker thread: redraw the open bars; a plain status line of the innermost phase
        if it has said nothing for a tick period."""
        with self._lock:
            if not self._open:
                return
            now = time.monotonic()
            for task in self._open:
                if task.bar is not None and now - task.start >= self.interval:
                    task.bar.refresh()
                    task.ticked = True
            task = self._open[-1]
            if self.plain and task.live and now - task.last_draw >= self._tick_period():
                task.last_draw = now
                self._line(task.status_line())


_CURRENT: contextvars.ContextVar[Progress | None] = contextvars.ContextVar("l4compile_progress", default=None)


def current() -> Progress:
    """The reporter of the running command; a silent one outside any (library use)."""
    progress = _CURRENT.get()
    return progress if progress is not None else Progress.silent()


def add_progress_args(parser: Any) -> None:
    """-q/--quiet and -v/--verbose on a subcommand (read back by `Progress.from_args`)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true",
                       help="print nothing on stderr but errors and the one line that says an existing output is "
                            "being replaced")
    group.add_argument("-v", "--verbose", action="store_true", help="more detail on stderr (per-pass times "
                       "and stats, the item each progress line is at)")


# ---- formatting ---------------------------------------------------------------------------------

def format_seconds(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 90:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _end_line(record: PhaseRecord, depth: int, bits: list[str]) -> str:
    """'  calibrate          1 min 05 s  64 batches, ...': name, time, FAILED where it failed, amounts."""
    state = " FAILED" if record.failed else ""
    return f"{'  ' * depth}{record.name:<{max(20 - 2 * depth, 1)}} " \
           f"{format_seconds(record.seconds or 0.0):>8}{state}{'  ' + ', '.join(bits) if bits else ''}"


def format_amount(value: float, unit: str) -> str:
    """'1.20 GB' for bytes, '1,234 tokens' otherwise."""
    if unit == "B":
        from l4compile.inspect import format_bytes
        return format_bytes(value)
    return f"{value:,.0f} {_plural(unit) if value != 1 else unit}"


def _count(done: float, total: float | None, unit: str) -> str:
    if total is None:
        return format_amount(done, unit)
    if unit == "B":
        return f"{format_amount(done, unit)} of {format_amount(total, unit)}"
    return f"{done:,.0f}/{format_amount(total, unit)}"


def _rate(per_second: float, unit: str | None) -> str:
    if unit == "B":
        from l4compile.inspect import format_bytes
        return f"{format_bytes(per_second)}/s"
    number = f"{per_second:,.0f}" if per_second >= 100 else f"{per_second:.3g}"
    return f"{number} {_plural(unit or 'item')}/s"


def _plural(unit: str | None) -> str:
    """Units are singular nouns ("tensor", "pass", "batch"); "B" stays as it is."""
    if not unit or unit == "B":
        return unit or ""
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _terminal_columns(stream: IO[str]) -> int:
    """The width the terminal reports, 0 where it reports none."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


def _env_interval() -> float | None:
    text = os.environ.get(INTERVAL_ENV)
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value >= 0 else None


class _NullStream:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False
