"""Progress as a user sees it: the CLI with stderr a pipe and a terminal, --quiet, --json, `run`'s summary."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest

from l4compile.cli import main
from tests.conftest import load, spec_path

BUILD_PHASES = ["load spec", "open weights", "lower", "passes", "write weights", "check"]


def cli(*args, interval: float = 0.0, stderr=subprocess.PIPE) -> subprocess.CompletedProcess:
    env = {**os.environ, "L4COMPILE_PROGRESS_INTERVAL": str(interval)}
    return subprocess.run([sys.executable, "-m", "l4compile.cli", *map(str, args)], stdout=subprocess.PIPE,
                          stderr=stderr, text=True, env=env)


def seconds(text: str) -> float:
    """Back from l4compile.progress.format_seconds: '0.12 s', '42 s', '3 min 05 s', '1 h 02 min'."""
    numbers = [float(n) for n in re.findall(r"[\d.]+", text)]
    scale = [3600, 60] if "h" in text.split() else [60, 1] if "min" in text else [1]
    return sum(n * s for n, s in zip(numbers, scale))


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory):
    """tiny-scout's random weights as a Hugging Face checkpoint of several safetensors shards."""
    from l4compile.hf.export import export_state_dict
    from l4compile.lower import lower
    from l4compile.weights import RandomWeights
    spec, weights = load("tiny-scout"), RandomWeights(0)
    state = {p.name: weights.get(p) for p in lower(spec, "float32", kv_cache=False).params()}
    out = tmp_path_factory.mktemp("hf") / "sharded"
    export_state_dict(state, spec, out, "float32", max_shard_bytes=100_000)
    assert len(list(out.glob("*.safetensors"))) >= 5
    return out


def test_build_from_shards_piped_reports_bytes_and_time_left_and_json_alone_on_stdout(sharded_checkpoint, tmp_path):
    r = cli("build", spec_path("tiny-scout"), "--weights", sharded_checkpoint, "-o", tmp_path / "b", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)          # stdout is the report and nothing else
    assert report["command"] == "build" and report["output"] == str(tmp_path / "b") and report["warnings"] == []
    assert report["files"]["model.onnx.data"] == (tmp_path / "b" / "model.onnx.data").stat().st_size
    assert report["pipeline"] == "onnx-cpu" and [p["name"] for p in report["passes"]][:2] == ["constant-fold",
                                                                                              "moe-dispatch"]
    phases = {p["name"]: p for p in report["phases"]}
    assert list(phases) == BUILD_PHASES
    written = phases["write weights"]
    assert written["count"] == report["tensors"] and written["size_unit"] == "B"
    assert 0 < written["size"] <= report["files"]["model.onnx.data"]

    err = r.stderr.splitlines()
    for name in BUILD_PHASES:                 # each phase's end line, with its time
        assert any(re.match(rf"{name} +[\d.]+ (ms|s)", line) for line in err), (name, r.stderr)
    assert err[-1].startswith("build finished in ")
    status = [re.match(r"write weights: (\d+)/(\d+) tensors, (.+) of (.+?), .*, (.+) elapsed, about (.+) left", line)
              for line in err if line.startswith("write weights: ")]
    assert status and all(status), r.stderr
    total = written["seconds"]
    late = [m for m in status if 2 * int(m[1]) >= int(m[2])]     # once half the tensors are written
    assert late
    for m in late:                            # elapsed + time left is the phase's actual time, roughly
        assert int(m[1]) < int(m[2]) and m[3] != m[4]
        assert abs(seconds(m[5]) + seconds(m[6]) - total) <= max(1.0, total), (m[0], total)


@pytest.mark.parametrize("size", [(120, 40), (0, 0)], ids=["sized", "unsized"])
def test_build_on_a_terminal_shows_a_bar_then_phase_lines(tmp_path, size):
    """Also on a terminal that gives no size (0 x 0, as under `script` or in some containers)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[1], size[0], 0, 0))
    env = {**os.environ, "L4COMPILE_PROGRESS_INTERVAL": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "l4compile.cli", "build", str(spec_path("tiny-scout")),
                             "--weights", "random", "-o", str(tmp_path / "b")],
                            stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:      # EIO: the terminal's last writer has gone
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    stdout = proc.stdout.read().decode()
    assert proc.wait() == 0
    terminal = b"".join(chunks).decode()
    bars = [bar for bar in re.split(r"[\r\n]", terminal) if bar.startswith("write weights:")]
    assert any(re.search(r"\d+%\|.*\| [\d.]+[kM]?/[\d.]+[kM]? \[[\d:]+<[\d:?]+, [\d.]+ ?[kMG]?B/s, \d+/\d+ tensors\]", bar)
               for bar in bars), terminal      # tqdm's bar: bytes, time left, rate, tensors
    lines = [line.split("\r")[-1] for line in terminal.splitlines()]
    for name in BUILD_PHASES:
        assert any(re.match(rf"{name} +[\d.]+ (ms|s)", line) for line in lines), (name, terminal)
    assert any(line.startswith("build finished in ") for line in lines)
    assert stdout.startswith("built tiny-scout -> ")        # the summary, on stdout as before


def test_quiet_prints_nothing_but_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("L4COMPILE_PROGRESS_INTERVAL", "0")
    assert main(["build", str(spec_path("tiny-scout")), "--weights", "random", "-o", str(tmp_path / "b"), "-q"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.startswith("built tiny-scout -> ")
    assert main(["build", str(spec_path("tiny-scout")), "--dry-run", "--pipeline", "onnx-cup", "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("l4compile: error: unknown pipeline 'onnx-cup'")


def test_full_size_dry_run_json(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("L4COMPILE_PROGRESS_INTERVAL", "0")
    assert main(["build", str(spec_path("maverick")), "--dry-run", "--dtype", "bfloat16", "--json",
                 "-o", str(tmp_path / "m")]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["dry_run"] and report["output"] is None and report["total_bytes"] > 7e11
    assert report["disk"]["fits"] is (report["total_bytes"] <= report["disk"]["free_bytes"])
    assert [p["name"] for p in report["phases"]] == ["load spec", "lower", "passes", "emit", "check", "vision model"]
    assert "emit " in err and err.splitlines()[-1].startswith("build finished in ")


def test_run_prints_ids_on_stdout_and_tokens_per_second_on_stderr(built_tiny, capsys, monkeypatch):
    monkeypatch.setenv("L4COMPILE_PROGRESS_INTERVAL", "0")
    assert main(["run", str(built_tiny("tiny-scout")), "--prompt-ids", "1,2,3", "--max-new-tokens", "6",
                 "--stop-ids", "255"]) == 0
    out, err = capsys.readouterr()
    assert re.fullmatch(r"1,2,3(,\d+){6}\n", out)
    (line,) = [line for line in err.splitlines() if line.startswith("generate  ")]
    assert "6 tokens" in line and "tokens/s" in line and "first token after" in line and "3-token prompt" in line


def test_export_and_quant_report_json(built_tiny, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("L4COMPILE_PROGRESS_INTERVAL", "0")
    build = str(built_tiny("tiny-scout"))
    assert main(["export-hf", build, "-o", str(tmp_path / "hf"), "--max-shard-size", "300KB", "--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["command"] == "export-hf" and len([f for f in report["files"] if f.endswith(".safetensors")]) > 1
    (write,) = [p for p in report["phases"] if p["name"] == "write shards"]
    assert write["count"] == report["tensors"] and write["size"] > 0
    assert "write shards" in err and "export-hf finished in" in err
    assert main(["quant-report", build, "--reference", build, "--batches", "1", "--json", "-q"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert err == "" and report["top1_agreement"] == 1.0
    assert [p["name"] for p in report["phases"]] == ["load builds", "run build", "run reference"]


def test_sharded_dry_run_json(capsys, monkeypatch):
    monkeypatch.setenv("L4COMPILE_PROGRESS_INTERVAL", "0")
    assert main(["build", str(spec_path("tiny-maverick")), "--target", "trt", "--tp", "2", "--dry-run", "--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["tp"] == 2 and report["dry_run"] and "rank_1/model.onnx.data" in report["files"]
    assert "sharding" in report and report["warnings"] == []
    names = [p["name"] for p in report["phases"]]
    assert names[:2] == ["load spec", "compile rank 0"] and "emit and check rank 1" in names
    assert err.splitlines()[-1].startswith("build finished in ")


def test_verify_counts_files_and_bytes_and_json(built_tiny, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("L4COMPILE_PROGRESS_INTERVAL", "0")
    build = str(built_tiny("tiny-scout"))
    assert main(["verify", build, "--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["command"] == "verify" and report["total_bytes"] == sum(report["files"].values()) > 0
    (phase,) = report["phases"]
    assert phase["name"] == "checksums" and phase["count"] == len(report["files"]) and \
        phase["size"] == report["total_bytes"]
    assert re.search(r"^checksums: 1/\d+ files, .* of .*B, .*B/s, .* elapsed, about .* left$", err, re.M), err
    assert re.search(r"^checksums +[\d.]+ s  \d+ files, ", err, re.M) and err.splitlines()[-1].startswith(
        "verify finished in ")
    assert main(["verify", build, "-q"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "sha256 checksums match" in out


def test_gptq_build_reports_calibrate_and_quantize_phases_and_stats(capsys, monkeypatch, tmp_path):
    """`build --quantize int4` with GPTQ: calibration (within the passes) counts batches and tokens; quantizing
    (as each tensor is written) is a part of "write weights" with its own time; --json has the stats."""
    monkeypatch.setenv("L4COMPILE_PROGRESS_INTERVAL", "0")
    monkeypatch.setattr("l4compile.build.GPTQ_CALIBRATION", {"batches": 2, "batch_size": 1, "seq_len": 16})
    assert main(["build", str(spec_path("tiny-scout")), "--weights", "random", "-o", str(tmp_path / "b"),
                 "--quantize", "int4", "--int4-method", "gptq", "--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    phases = [(p["name"], p.get("within")) for p in report["phases"]]
    assert phases == [("load spec", None), ("open weights", None), ("lower", None), ("passes", None),
                      ("load reference", "passes"), ("calibrate", "passes"), ("write weights", None),
                      ("quantize", "write weights"), ("check", None)]
    named = {p["name"]: p for p in report["phases"]}
    assert named["calibrate"]["count"] == 2 and named["calibrate"]["size"] == 32 and \
        named["calibrate"]["size_unit"] == "token"
    stats = report["quantization"]["passes"]["quantize-int4"]
    assert report["quantization"]["method"] == "gptq" and stats["weights_gptq"] > 0
    assert stats["weight_bytes_after"] == report["files"]["model.onnx.data"] < stats["weight_bytes_before"]
    assert 0 < named["quantize"]["seconds"] <= named["write weights"]["seconds"]
    assert named["quantize"]["count"] >= stats["weights_gptq"]     # every quantized weight, GPTQ's among them
    lines = err.splitlines()
    assert re.search(r"^  calibrate: 1/2 batches, 16/32 tokens, .* about .* left$", err, re.M), err
    assert lines.index(next(line for line in lines if line.startswith("  quantize "))) + 1 == \
        lines.index(next(line for line in lines if re.match(r"write weights +[\d.]+ s", line)))


def test_sharded_build_json_counts_every_rank_and_names_each_ranks_tensorrt_steps(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("L4COMPILE_PROGRESS_INTERVAL", "0")
    assert main(["build", str(spec_path("tiny-maverick")), "--target", "trt", "--tp", "2", "--weights", "random",
                 "-o", str(tmp_path / "b"), "--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    phases = [(p["name"], p.get("within")) for p in report["phases"]]
    assert phases[:2] == [("load spec", None), ("open weights", None)]
    assert ("compile rank 1", None) in phases and ("passes", "compile rank 1") in phases
    assert ("compat check", "TensorRT rank 0") in phases and ("compat check", "TensorRT rank 1") in phases
    (written,) = [p for p in report["phases"] if p["name"] == "write weights"]
    data = sum(size for name, size in report["files"].items() if name.endswith("/model.onnx.data"))
    assert written["count"] == report["tensors"] and 0 < written["size"] <= data
    assert re.search(r"^write weights: \d+/\d+ tensors, .* of .*, about .* left$", err, re.M), err
    assert err.splitlines()[-1].startswith("build finished in ")


def test_verbose_adds_the_pipeline_and_each_pass(capsys, monkeypatch):
    monkeypatch.setenv("L4COMPILE_PROGRESS_INTERVAL", "0")
    args = ["build", str(spec_path("tiny-scout")), "--dry-run"]
    assert main(args) == 0
    plain = capsys.readouterr().err
    assert main([*args, "-v"]) == 0
    verbose = capsys.readouterr().err
    for text in (plain, verbose):
        assert re.search(r"^passes +[\d.]+ s  10 passes", text, re.M), text
    assert "pipeline onnx-cpu: constant-fold" not in plain and "pipeline onnx-cpu: constant-fold" in verbose
    assert re.search(r"^  moe-dispatch +[\d.]+ ms  changed  blocks=4", verbose, re.M), verbose
    assert re.search(r"^passes: 1/10 passes, .*, constant-fold$", verbose, re.M), verbose   # the item it is at


def test_run_on_a_terminal_it_shares_with_stdout_shows_no_bar_among_the_tokens(built_tiny):
    """`run` with stdout and stderr on one terminal: the ids stay one unbroken line, the phase lines follow."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "L4COMPILE_PROGRESS_INTERVAL": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "l4compile.cli", "run", str(built_tiny("tiny-scout")),
                             "--prompt-ids", "1,2,3", "--max-new-tokens", "24", "--stop-ids", "255"],
                            stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait() == 0
    terminal = b"".join(chunks).decode().replace("\r\n", "\n")
    assert "generate:" not in terminal and "generate ..." not in terminal, terminal
    (ids,) = [line for line in terminal.split("\n") if line.startswith("1,2,3,")]
    assert re.fullmatch(r"1,2,3(,\d+)+", ids), terminal
    new = len(ids.split(",")) - 3
    assert re.search(rf"\ngenerate +[\d.]+ s  {new} tokens?, [\d.,]+ tokens/s", terminal), terminal


def test_a_vision_build_counts_the_vision_models_tensors_too(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("L4COMPILE_PROGRESS_INTERVAL", "0")
    assert main(["build", str(spec_path("tiny-vision")), "--weights", "random", "-o", str(tmp_path / "b"),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    written = [(p.get("within"), p["count"], p["size"]) for p in report["phases"] if p["name"] == "write weights"]
    (_, text, text_bytes), (within, vision, vision_bytes) = written
    assert within == "vision model" and text + vision == report["tensors"]
    assert 0 < vision_bytes <= report["files"]["vision.onnx.data"] and text_bytes <= report["files"]["model.onnx.data"]
