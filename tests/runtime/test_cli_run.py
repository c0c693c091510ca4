"""`l4compile run`: streams generated ids; bad input is one line and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from l4compile.runtime import Engine


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "l4compile.cli", "run", *map(str, args)], capture_output=True, text=True)


def test_run_prints_prompt_and_greedy_tokens(built_tiny):
    build = built_tiny("tiny-scout")
    r = run_cli(build, "--prompt-ids", "1,2,3", "--max-new-tokens", "12", "--stop-ids", "999")
    assert r.returncode == 0, r.stderr
    ids = [int(t) for t in r.stdout.strip().split(",")]
    want = Engine.load(build).generate(np.array([[1, 2, 3]]), 12, stop_tokens=())
    assert ids == want[0].tolist()


def test_run_sampling_is_seeded(built_tiny):
    args = (built_tiny("tiny-scout"), "--prompt-ids", "4,5", "--max-new-tokens", "10", "--temperature", "0.9",
            "--top-p", "0.9", "--top-k", "50", "--seed", "3", "--stop-ids", "999")
    assert run_cli(*args).stdout == run_cli(*args).stdout


def test_run_bad_input(built_tiny):
    for args, message in [(("--prompt-ids", "1,2,300"), "outside the vocabulary"),
                          (("--prompt-ids", "1,x"), "comma-separated token ids"),
                          (("--prompt-ids", "1", "--top-p", "2"), "top_p must be in")]:
        r = run_cli(built_tiny("tiny-scout"), *args)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr
        assert r.stdout == ""
