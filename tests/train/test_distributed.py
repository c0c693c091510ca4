"""Data parallel on 2 ranks (torchrun, gloo, FSDP2): the same losses as 1 rank with the same global batch,
and a checkpoint sharded over 2 ranks resumes on 1 with the uninterrupted losses."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.train.conftest import TINY_SCOUT, losses, train

ARGS = ("--tokenizer", "bytes", "--seq-len", "32", "--batch", "4", "--lr", "3e-3", "--steps", "5", "--warmup", "1")


@pytest.mark.slow
def test_two_ranks_match_one_rank_and_resume_on_one(corpus, tmp_path):
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "l4compile", "train", TINY_SCOUT, "--data", str(corpus), *ARGS, "--save-every", "3", "-o", str(two)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("step 5/5") == 1  # rank 0 logs, rank 1 does not
    one = tmp_path / "one"
    assert train("--data", corpus, *ARGS[6:], "-o", one) == 0
    expected, got = losses(one), losses(two)
    assert set(got) == {1, 2, 3, 4, 5}
    for step, loss in expected.items():
        assert abs(got[step] - loss) <= 1e-5, (step, got[step], loss)
    resumed = tmp_path / "resumed"
    assert train("--data", corpus, *ARGS[6:], "--resume", two / "checkpoints" / "step-000003", "-o", resumed) == 0
    for step in (4, 5):
        assert abs(losses(resumed)[step] - expected[step]) <= 1e-5
