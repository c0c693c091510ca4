"""Numeric options: one validation for the Python API and the CLI (runtime/options.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from l4compile.cli import main
from l4compile.runtime import Engine, RuntimeInputError, options
from l4compile.runtime.sampling import Sampling

BAD_GENERATE = [
    ({"temperature": math.nan}, "temperature must be a finite number"),
    ({"temperature": math.inf}, "temperature must be a finite number"),
    ({"temperature": "0.5"}, "temperature must be a number"),
    ({"temperature": True}, "temperature must be a number"),
    ({"top_p": math.nan}, "top_p must be a finite number"),
    ({"top_p": 1.5}, "top_p must be in"),
    ({"top_k": 2.0}, "top_k must be an integer"),
    ({"top_k": True}, "top_k must be an integer"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
    ({"max_new_tokens": -1}, "max_new_tokens must be >= 0"),
    ({"max_new_tokens": False}, "max_new_tokens must be an integer"),
    ({"max_new_tokens": 2**63}, r"max_new_tokens must be below 2\*\*63"),
    ({"seed": "x"}, "seed must be an integer"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"seed": 1.0}, "seed must be an integer"),
    ({"stop_tokens": 2}, "stop_tokens must be a list"),
    ({"stop_tokens": "2"}, "stop_tokens must be a list"),
    ({"stop_tokens": np.array(2)}, "stop_tokens must be a list"),
    ({"stop_tokens": np.int64(2)}, "stop_tokens must be a list"),
    ({"stop_tokens": [2.5]}, "stop token must be an integer"),
    ({"stop_tokens": [-3]}, "stop token must be >= 0"),
]


@pytest.fixture(scope="module")
def engine(built_tiny):
    return Engine.load(built_tiny("tiny-scout"))


@pytest.mark.parametrize("kwargs, message", BAD_GENERATE)
def test_generate_and_stream_refuse_bad_options(kwargs, message, engine):
    args = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(RuntimeInputError, match=message):
        engine.generate(np.array([[1, 2]]), **args)
    with pytest.raises(RuntimeInputError, match=message):
        list(engine.stream(np.array([1, 2]), **args))
    assert engine.generate(np.array([[1, 2]]), 2, stop_tokens=()).shape == (1, 4)   # still usable


def test_good_options_are_normalised(engine):
    out = engine.generate(np.array([[1, 2]]), np.int64(3), temperature=1, top_k=np.int32(5), seed=np.uint64(7),
                          stop_tokens=np.array([999]))
    assert out.shape == (1, 5)
    assert Sampling(temperature=1, top_k=np.int64(3)).top_k == 3
    assert options.stop_tokens([np.int64(4), 5]) == (4, 5)


@pytest.mark.parametrize("threads", [0, -1, 2.5, "2", True, 10**6])
def test_load_refuses_bad_threads(threads, built_tiny):
    with pytest.raises(RuntimeInputError, match="threads must be"):
        Engine.load(built_tiny("tiny-scout"), threads=threads)


@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "nan", "temperature must be a finite number"),
    ("--temperature", "inf", "temperature must be a finite number"),
    ("--temperature", "-0.5", "temperature must be >= 0"),
    ("--top-p", "nan", "top_p must be a finite number"),
    ("--top-p", "0", "top_p must be in"),
    ("--top-k", "-1", "top_k must be >= 0"),
    ("--top-k", "1.5", "expected a count"),
    ("--seed", "-1", "seed must be >= 0"),
    ("--seed", "x", "expected a non-negative integer"),
    ("--max-new-tokens", "2.5", "expected a count"),
    ("--max-new-tokens", "-2", "max_new_tokens must be >= 0"),
    ("--threads", "0", "threads must be >= 1"),
])
def test_cli_run_refuses_bad_numbers(flag, value, message, built_tiny, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(built_tiny("tiny-scout")), "--prompt-ids", "1,2", flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["build", "specs/tiny-scout.yaml", "--weights", "random", "--seed", "-1"], "seed must be >= 0"),
    (["inspect", "specs/scout.yaml", "--budget", "1e999"], "expected a size below 2**63"),
    (["inspect", "specs/scout.yaml", "--context", "0"], "value must be >= 1, got 0"),
    (["inspect", "specs/scout.yaml", "--context", "x"], "expected a positive integer, found 'x'"),
    (["inspect", "specs/scout.yaml", "--context", str(2**70)], "below 2**63"),
    (["export-hf", "x", "-o", "y", "--max-shard-size", "0"], "value must be >= 1, got 0"),
    (["quant-report", "x", "--reference", "y", "--threads", "0"], "threads must be >= 1"),
    (["build", "specs/tiny-scout.yaml", "--target", "trt", "--max-seq", "-3"], "value must be >= 1, got -3"),
    (["train", "s.yaml", "--data", "d.txt", "--lr", "nan"], "lr must be a finite number"),
    (["train", "s.yaml", "--data", "d.txt", "--beta2", "1"], "beta2 must be < 1"),
    (["train", "s.yaml", "--data", "d.txt", "--seed", "-1"], "seed must be >= 0"),
    (["train", "s.yaml", "--data", "d.txt", "--warmup", "2.5"], "expected a non-negative integer"),
    (["train", "s.yaml", "--data", "d.txt", "--eval-fraction", "inf"], "eval_fraction must be a finite number"),
    (["train", "s.yaml", "--data", "d.txt", "--threads", "0"], "threads must be >= 1"),
])
def test_cli_numeric_flags_are_one_line_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_python_api_shares_the_checks():
    from l4compile.hf.export import export_checkpoint
    from l4compile.weights import RandomWeights
    with pytest.raises(RuntimeInputError, match="seed must be >= 0"):
        RandomWeights(-1)
    with pytest.raises(RuntimeInputError, match="max_shard_bytes must be >= 1"):
        export_checkpoint(None, {}, "unused", "float32", max_shard_bytes=0)
    with pytest.raises(RuntimeInputError, match="max_shard_bytes must be an integer"):
        export_checkpoint(None, {}, "unused", "float32", max_shard_bytes=1e9)
