"""The progress reporter on its own: plain lines, held lines, quiet, nesting, the --json part, its cost."""

from __future__ import annotations

import io
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


def test_library_use_is_silent_and_a_phase_without_a_reporter_is_harmless():
    assert current().verbosity == QUIET
    with current().phase("write weights", total=1, unit="tensor") as task:
        task.advance(1, 10)


def test_updates_are_cheap_lines_at_most_once_per_interval():
    progress, stream = plain(interval=1.0)
    progress._held = None                          # print at once (no held lines), to count them
    start = time.monotonic()
    with progress.activate():
        with current().phase("generate", total=200_000, unit="token") as task:
            for _ in range(200_000):
                task.advance(1)
    elapsed = time.monotonic() - start
    lines = stream.getvalue().splitlines()
    assert len(lines) <= 2 + elapsed / 1.0 + 1     # start, end, and one status line per interval at most


def test_format_seconds():
    assert format_seconds(0.123) == "0.12 s" and format_seconds(42.4) == "42 s"
    assert format_seconds(185) == "3 min 05 s" and format_seconds(3 * 3600 + 120) == "3 h 02 min"
