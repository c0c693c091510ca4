"""`l4compile run`: streams generated ids; bad input is one line and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from l4compile.runtime import Engine


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "l4compile.cli", "run", *map(str, args)], capture_output=True, text=True)


def printed_ids(result: subprocess.CompletedProcess) -> list[int]:
    """The comma-separated ids a successful `run` printed."""
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return [int(t) for t in result.stdout.strip().split(",")]


def test_run_prints_prompt_and_greedy_tokens(built_tiny):
    build = built_tiny("tiny-scout")
    ids = printed_ids(run_cli(build, "--prompt-ids", "1,2,3", "--max-new-tokens", "12", "--stop-ids", "999"))
    want = Engine.load(build).generate(np.array([[1, 2, 3]]), 12, stop_tokens=())
    assert ids == want[0].tolist()


def test_run_sampling_is_seeded(built_tiny):
    """Same seed, same tokens (and the Engine's); another seed, other tokens. At temperature 1.5 over a
    256-token vocabulary each of the 10 draws has many likely candidates, so seeds 3 and 4 differ."""
    build = built_tiny("tiny-scout")
    sampling = dict(temperature=1.5, top_p=0.95, top_k=50)
    flags = [x for k, v in sampling.items() for x in (f"--{k.replace('_', '-')}", v)]

    def run(seed):
        return printed_ids(run_cli(build, "--prompt-ids", "4,5", "--max-new-tokens", "10", *flags,
                                   "--seed", seed, "--stop-ids", "999"))
    first, again, other = run(3), run(3), run(4)
    assert len(first) == 2 + 10 and first[:2] == [4, 5]
    assert first == again
    engine = Engine.load(build)
    want = engine.generate(np.array([[4, 5]]), 10, **sampling, seed=3, stop_tokens=())
    assert first == want[0].tolist()          # the flags reached the sampler
    assert other[:2] == [4, 5] and other != first
    assert first != engine.generate(np.array([[4, 5]]), 10, stop_tokens=())[0].tolist()   # not greedy


def test_run_bad_input(built_tiny):
    for args, message in [(("--prompt-ids", "1,2,300"), "outside the vocabulary"),
                          (("--prompt-ids", "1,x"), "comma-separated token ids"),
                          (("--prompt-ids", "1", "--top-p", "2"), "top_p must be in")]:
        r = run_cli(built_tiny("tiny-scout"), *args)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr
        assert r.stdout == ""
