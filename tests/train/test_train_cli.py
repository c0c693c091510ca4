"""`l4compile train` in one process: metrics, checkpoints, exact resume, export, and one-line errors."""

from __future__ import annotations

import json

import pytest

from l4compile.cli import main
from tests.train.conftest import TINY_SCOUT, losses, train


def test_train_writes_metrics_and_a_checkpoint_export_hf_reads(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert train("--data", corpus, "--steps", 3, "-o", run) == 0
    err = capsys.readouterr().err
    assert "step 3/3  loss " in err and "tokens/s" in err and "grad_norm" in err and "lr " in err
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "aux_loss"} <= set(metrics[0])
    assert metrics[-1]["eval_loss"] is not None and metrics[-1]["loss"] < metrics[0]["loss"]
    assert (run / "checkpoints" / "step-000003" / ".complete").is_file()
    assert main(["export-hf", str(run), "-o", str(tmp_path / "hf")]) == 0
    from transformers import Llama4ForCausalLM
    model = Llama4ForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.num_hidden_layers == 4


def test_resume_reproduces_the_uninterrupted_losses(corpus, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = ("--data", corpus, "--steps", 4, "--warmup", 1)
    assert train(*common, "-o", whole) == 0
    assert train(*common, "-o", split, "--stop-after", 2) == 0
    assert losses(split) == {k: v for k, v in losses(whole).items() if k <= 2}
    assert train(*common, "--resume", split) == 0
    assert losses(split) == losses(whole)  # exactly: same data order, weights, optimizer state, schedule


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
