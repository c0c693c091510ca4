"""`l4compile train` in one process: metrics, checkpoints, exact resume, export, and one-line errors."""

from __future__ import annotations

import json
import re

import pytest

from l4compile.cli import main
from tests.train.conftest import TINY_SCOUT, losses, train


def test_train_writes_metrics_and_a_checkpoint_export_hf_reads(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert train("--data", corpus, "--steps", 3, "-o", run) == 0
    err = capsys.readouterr().err
    assert "step 3/3  loss " in err and "tokens/s" in err and "grad_norm" in err and "lr " in err
    phases = [re.match(r"( *[a-z ]+?) {2,}[\d.]+ s", line) for line in err.splitlines()]   # each phase's end line
    assert [m[1] for m in phases if m] == ["read data", "load model", "  evaluate", "  checkpoint", "train"], err
    assert re.search(r"^train +[\d.]+ s  3 steps, [\d,]+ tokens, [\d.]+ steps/s, [\d,.]+ tokens/s$", err, re.M)
    assert err.splitlines()[-1].startswith("train finished in ")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "aux_loss"} <= set(metrics[0])
    assert metrics[-1]["eval_loss"] is not None and metrics[-1]["loss"] < metrics[0]["loss"]
    assert (run / "checkpoints" / "step-000003" / ".complete").is_file()
    assert main(["export-hf", str(run), "-o", str(tmp_path / "hf"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in report["phases"]] == ["load checkpoint", "write shards"]
    from transformers import Llama4ForCausalLM
    model = Llama4ForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.num_hidden_layers == 4


def test_resume_reproduces_the_uninterrupted_losses(corpus, tmp_path, capsys):
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = ("--data", corpus, "--steps", 4, "--warmup", 1)
    capsys.readouterr()
    assert train(*common, "-o", whole, "-q") == 0
    assert capsys.readouterr().err == ""     # --quiet: no step lines, no phases
    assert train(*common, "-o", split, "--stop-after", 2) == 0
    assert losses(split) == {k: v for k, v in losses(whole).items() if k <= 2}
    capsys.readouterr()
    assert train(*common, "--resume", split, "--json") == 0
    assert losses(split) == losses(whole)  # exactly: same data order, weights, optimizer state, schedule
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 4 and report["steps_run"] == 2 and report["last"]["loss"] == losses(whole)[4]
    assert report["checkpoint"].endswith("step-000004") and report["run"] == str(split)
    assert [p["name"] for p in report["phases"]] == ["read data", "load model", "train", "evaluate", "checkpoint"]


def test_bad_input_is_one_clear_line(corpus, tmp_path, capsys):
    def error(*args, spec=TINY_SCOUT) -> str:
        assert train(*args, spec=spec) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("l4compile: error: ")
        return lines[0]

    out = ("-o", tmp_path / "run")
    assert "no such file" in error("--data", tmp_path / "missing.txt", *out)
    (tmp_path / "empty.txt").write_text("")
    assert "no tokens" in error("--data", tmp_path / "empty.txt", *out)
    assert "past the context" in error("--data", corpus, "--seq-len", 5000, *out)
    assert train("--data", corpus, "--steps", 1, *out) == 0
    capsys.readouterr()
    message = error("--data", corpus, "--steps", 2, "--resume", tmp_path / "run",
                    spec=TINY_SCOUT.replace("tiny-scout", "tiny-maverick"))
    assert "trained with spec 'tiny-scout'" in message and "spec.yaml" in message
    assert "already holds a training run" in error("--data", corpus, *out)
    (tmp_path / "mine").mkdir()   # a run writes spec.yaml and run.json: never over a user's files
    (tmp_path / "mine" / "spec.yaml").write_text("my spec")
    assert "is not an empty directory" in error("--data", corpus, "-o", tmp_path / "mine")
    assert "is not an empty directory" in error("--data", corpus, "-o", corpus)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["spec.yaml"]
    assert (tmp_path / "mine" / "spec.yaml").read_text() == "my spec"


def test_sigterm_stops_after_a_step_with_a_checkpoint_that_resumes_exactly(corpus, tmp_path):
    """A preempted run (SIGTERM, as a scheduler or torchrun sends it) saves the step it finished; --resume then
    reproduces the uninterrupted losses."""
    import signal
    import subprocess
    import sys
    import time
    run, whole = tmp_path / "run", tmp_path / "whole"
    common = ["--data", str(corpus), "--steps", "500", "--warmup", "1", "--eval-fraction", "0"]
    cmd = [sys.executable, "-m", "l4compile", "train", TINY_SCOUT, "--tokenizer", "bytes", "--seq-len", "32",
           "--batch", "4", "--lr", "3e-3", "--threads", "1", *common]
    proc = subprocess.Popen([*cmd, "-o", str(run)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            metrics = run / "metrics.jsonl"
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    stopped = max(losses(run))
    assert 2 <= stopped < 500
    assert (run / "checkpoints" / f"step-{stopped:06d}" / ".complete").is_file()
    assert err.strip().splitlines()[-1] == (f"l4compile: terminated: stopped after step {stopped} with a checkpoint; "
                                            f"continue with --resume {run}")
    assert train(*common, "--resume", run, "--stop-after", 2) == 0
    assert train(*common, "-o", whole, "--stop-after", stopped + 2) == 0
    assert losses(run) == losses(whole)


def test_bfloat16_autocast_trains_close_to_float32(corpus, tmp_path):
    assert train("--data", corpus, "--steps", 3, "-o", tmp_path / "fp32") == 0
    assert train("--data", corpus, "--steps", 3, "--dtype", "bfloat16", "-o", tmp_path / "bf16") == 0
    fp32, bf16 = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert fp32 != bf16                                    # autocast really ran in bfloat16
    assert all(abs(bf16[s] - fp32[s]) <= 0.02 * fp32[s] for s in fp32)


@pytest.mark.slow
def test_compile_gives_the_eager_losses(corpus, tmp_path):
    """--compile (inductor, ~40 s to compile here) computes the eager model's function."""
    assert train("--data", corpus, "--steps", 2, "-o", tmp_path / "eager") == 0
    assert train("--data", corpus, "--steps", 2, "--compile", "-o", tmp_path / "compiled") == 0
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert eager.keys() == compiled.keys() and all(abs(eager[s] - compiled[s]) <= 1e-5 for s in eager)
