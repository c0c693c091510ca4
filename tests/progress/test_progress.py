"""The progress reporter on its own: plain lines, held lines, quiet, nesting, the --json part, its cost."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import termios
import threading
import time

import pytest

from l4compile.progress import QUIET, VERBOSE, Progress, current, format_seconds


def plain(interval: float = 0.0, verbosity: int = 1) -> tuple[Progress, io.StringIO]:
    stream = io.StringIO()
    return Progress(stream, verbosity=verbosity, interactive=False, interval=interval), stream


def test_phases_print_start_status_and_end_lines_and_a_summary():
    progress, stream = plain()
    with progress.activate():
        with current().phase("write weights", total=4, unit="tensor", size_total=4000) as task:
            for i in range(4):
                task.advance(1, 1000, f"w{i}")
        with current().phase("check"):
            pass
    progress.finish("build")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "write weights ... 4 tensors, 4.00 KB"
    status = [line for line in lines if line.startswith("write weights: ")]
    assert status and all("left" in line and " of 4.00 KB" in line for line in status)
    assert len(status) == 3          # not after the last tensor: the end line follows at once
    end = lines[1 + len(status)]
    assert end.startswith("write weights ") and "4 tensors, 4.00 KB" in end and "tensors/s" in end
    assert lines[-3:-1] == ["check ...", lines[-2]] and lines[-2].startswith("check  ")
    assert lines[-1].startswith("build finished in ")


def test_lines_of_the_first_interval_are_held_and_a_failure_drops_them():
    progress, stream = plain(interval=60)
    with progress.activate():
        with current().phase("lower"):
            pass
        assert stream.getvalue() == ""            # held
    progress.finish("build")
    assert stream.getvalue().splitlines()[0].startswith("lower ")   # the start line gave way to the end line
    assert len(stream.getvalue().splitlines()) == 2

    progress, stream = plain(interval=60)
    with pytest.raises(KeyError), progress.activate():
        with current().phase("lower"):
            pass
        with current().phase("passes"):
            raise KeyError("boom")
    assert stream.getvalue() == ""                # the error is all the user needs to see
    assert [(r.name, r.failed) for r in progress.phases] == [("lower", False), ("passes", True)]


def test_quiet_prints_nothing_but_records_phases_and_warnings():
    progress, stream = plain(verbosity=QUIET)
    with progress.activate():
        with current().phase("calibrate", total=2, unit="batch", size_total=256, size_unit="token") as task:
            task.advance(1, 128)
            task.advance(1, 128)
        current().warn("int4 by round to nearest")
        current().note("a note")
    progress.finish("build")
    assert stream.getvalue() == ""
    report = progress.report()
    assert report["warnings"] == ["int4 by round to nearest"]
    (phase,) = report["phases"]
    assert phase["name"] == "calibrate" and phase["count"] == 2 and phase["unit"] == "batch"
    assert phase["size"] == 256 and phase["size_unit"] == "token" and phase["seconds"] >= 0


def test_nested_phases_are_indented_and_say_where_they_ran():
    progress, stream = plain(verbosity=VERBOSE)
    with progress.activate():
        with current().phase("passes", total=1, unit="pass") as passes:
            with current().phase("calibrate", total=1, unit="batch") as task:
                task.advance(1)
            passes.advance(item="quantize-int4")
        current().detail("only with -v")
    text = stream.getvalue()
    assert "\n  calibrate " in text and "only with -v" in text
    assert [p.get("within") for p in progress.report()["phases"]] == [None, "passes"]


def test_a_part_sums_its_stretches_within_a_phase_and_shows_before_its_end_line():
    progress, stream = plain()
    with progress.activate():
        with current().phase("write weights", total=3, unit="tensor") as task:
            for quantized in (True, False, True):
                if quantized:
                    with current().part("quantize", unit="tensor"):
                        pass
                task.advance(1)
        with current().part("quantize", unit="tensor"):   # outside any phase: nothing recorded
            pass
    lines = stream.getvalue().splitlines()
    assert re.match(r"  quantize +[\d.]+ s  2 tensors", lines[-2]) and lines[-1].startswith("write weights  ")
    (part,) = [p for p in progress.report()["phases"] if p["name"] == "quantize"]
    assert part["within"] == "write weights" and part["count"] == 2 and part["unit"] == "tensor"


def test_library_use_is_silent_and_a_phase_without_a_reporter_is_harmless():
    assert current().verbosity == QUIET
    with current().phase("write weights", total=1, unit="tensor") as task:
        task.advance(1, 10)


def generate(progress: Progress, tokens: int) -> float:
    """A 'generate' phase advanced one token at a time under `progress`; the seconds it took."""
    start = time.monotonic()
    with progress.activate():
        with current().phase("generate", total=tokens, unit="token") as task:
            for _ in range(tokens):
                task.advance(1)
    return time.monotonic() - start


def test_updates_are_cheap_lines_at_most_once_per_interval():
    progress, stream = plain(interval=1.0)
    progress._held = None                          # print at once (no held lines), to count them
    elapsed = generate(progress, 200_000)
    lines = stream.getvalue().splitlines()
    assert len(lines) <= 2 + elapsed / 1.0 + 1     # start, end, and one status line per interval at most


class Terminal:
    """A pseudo-terminal of the given size (0 x 0: one that does not say, as under `script`) as a Progress
    stream; `screen_lines()` is what it shows, line by line (each line's text after its last carriage return)."""

    def __init__(self, columns: int, rows: int) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        attrs = termios.tcgetattr(slave)
        attrs[1] &= ~termios.OPOST           # "\n" stays "\n"
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        self.stream = os.fdopen(slave, "w", encoding="utf-8")
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:                  # EIO: the writer side has closed
                return
            if not chunk:
                return
            self.chunks.append(chunk)

    def close(self) -> str:
        """Everything written to the terminal."""
        if not self.stream.closed:
            self.stream.close()
            self.reader.join()
            os.close(self.master)
        return b"".join(self.chunks).decode()

    @staticmethod
    def screen_lines(text: str) -> list[str]:
        return [line.split("\r")[-1] for line in text.split("\n")]


@pytest.fixture
def terminal():
    opened: list[Terminal] = []
    yield lambda columns=120, rows=40: opened.append(Terminal(columns, rows)) or opened[-1]
    for t in opened:
        t.close()


@pytest.mark.parametrize("size", [(120, 40), (0, 0)], ids=["sized", "unsized"])
def test_a_terminal_gets_a_bar_with_count_rate_and_time_left_whatever_size_it_gives(terminal, size):
    terminal = terminal(*size)
    progress = Progress(terminal.stream, interval=0.0)
    assert progress.interactive
    with progress.activate():
        with current().phase("calibrate", total=4, unit="batch", size_total=400, size_unit="token") as task:
            for _ in range(4):
                task.advance(1, 100)
    text = terminal.close()
    bars = [part for part in re.split(r"[\r\n]", text) if part.startswith("calibrate:")]
    assert bars, text
    assert re.search(r"calibrate: +100%\|.*\| 400/400 \[[\d:]+<[\d:]+, [\d.]+[kMG]? tokens/s, 4/4 batches\]", bars[-1]), bars
    assert re.match(r"calibrate +[\d.]+ s  4 batches, 400 tokens", Terminal.screen_lines(text)[0]), text


def test_a_bar_only_the_ticker_drew_is_cleared_before_its_end_line(terminal):
    terminal = terminal()
    progress = Progress(terminal.stream, interval=0.0)
    with progress.activate():
        with current().phase("load reference"):
            progress._tick_once()            # what the ticker thread does while a phase reports nothing
    text = terminal.close()
    assert "load reference ... 00:00" in text
    assert re.fullmatch(r"load reference +[\d.]+ s", Terminal.screen_lines(text)[0]), text


def test_a_terminal_bar_is_drawn_at_most_once_per_interval(terminal):
    terminal = terminal()
    progress = Progress(terminal.stream, interval=0.5)
    elapsed = generate(progress, 50_000)
    draws = [part for part in re.split(r"[\r\n]", terminal.close()) if part.startswith("generate:")]
    assert len(draws) <= 2 + 2 * elapsed / 0.5 + 1   # tqdm's and the ticker's redraws, each once per interval


def test_format_seconds():
    assert format_seconds(0.123) == "0.12 s" and format_seconds(42.4) == "42 s"
    assert format_seconds(185) == "3 min 05 s" and format_seconds(3 * 3600 + 120) == "3 h 02 min"
