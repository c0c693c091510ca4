"""Planning a sharded build: per-rank weights and KV cache, the fit verdict, one error for an impossible split.
Full-size specs, no weights allocated."""

from __future__ import annotations

from functools import lru_cache

import pytest

from l4compile.cli import main
from l4compile.errors import BuildError, PassError
from l4compile.shard.plan import plan_spec
from tests.conftest import load, spec_path


@lru_cache(maxsize=None)
def _plan(name: str, tp: int):
    return plan_spec(load(name), tp, "bfloat16", max_seq=4096)


@pytest.mark.parametrize("name,tp", [("maverick", 8), ("scout", 2)])
def test_ranks_add_up_to_the_unsharded_total_and_fit_an_h200(name, tp):
    plan = _plan(name, tp)
    assert len(plan.ranks) == tp and plan.fits
    total = sum(r.weight_bytes for r in plan.ranks)
    assert total == plan.unsharded_weight_bytes + (tp - 1) * plan.replicated_weight_bytes
    assert len({r.weight_bytes for r in plan.ranks}) == 1             # equal blocks
    assert plan.ranks[0].kv_heads == max(1, 8 // tp)


def test_kv_cache_per_rank_at_the_profiles_maximum_sequence():
    plan = _plan("maverick", 8)
    # 48 layers: 36 chunked (chunk 8192 > 4096: all 4096 positions) + 12 global, 1 KV head of 128, K and V, bf16
    assert plan.ranks[0].kv_cache_bytes == 2 * 1 * 128 * 2 * 4096 * 48


def test_a_rank_that_does_not_fit_is_one_error():
    plan = _plan("maverick", 2)
    assert not plan.fits
    with pytest.raises(BuildError, match="--tp 2: rank 0 needs .* but a GPU has 141.00 GB"):
        plan.raise_if_unfit()


def test_inspect_tp_prints_each_rank_and_refuses_an_impossible_split(capsys):
    assert main(["inspect", str(spec_path("scout")), "--tp", "2", "--gpu-memory", "141GB"]) == 0
    out = capsys.readouterr().out
    assert "rank 1: weights" in out and "fits" in out and "NOT" not in out
    assert main(["inspect", str(spec_path("maverick")), "--tp", "3"]) == PassError.exit_code
    assert "40 attention heads do not split evenly over 3 ranks" in capsys.readouterr().err
    assert main(["inspect", str(spec_path("scout")), "--tp", "2", "--gpu-memory", "40GB"]) == BuildError.exit_code
    captured = capsys.readouterr()
    assert "does NOT fit" in captured.out and "but a GPU has 40.00 GB" in captured.err


@pytest.mark.slow
@pytest.mark.parametrize("args", [["specs/scout.yaml", "--tp", "2", "--dtype", "bfloat16"],
                                  ["specs/maverick.yaml", "--tp", "8", "--dtype", "bfloat16", "--quantize", "fp8"]])
def test_full_size_sharded_dry_run(args, capsys):
    from tests.conftest import ROOT
    args = [str(ROOT / args[0])] + args[1:]
    assert main(["build", *args, "--target", "trt", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "rank graphs verified and checked" in out and "does NOT fit" not in out


def test_options_a_sharded_build_refuses():
    from l4compile.build import BuildOptions
    from l4compile.shard.build import check_options
    with pytest.raises(BuildError, match="add --no-quantize-activations"):
        check_options(BuildOptions(target="trt", tp=2, quantize="fp8"))
    check_options(BuildOptions(target="trt", tp=2, quantize="fp8", quantize_activations=False))
    with pytest.raises(BuildError, match="use --int4-method rtn"):
        check_options(BuildOptions(target="trt", tp=2, quantize="int4", int4_method="gptq"))
    with pytest.raises(BuildError, match="use --target trt"):
        check_options(BuildOptions(target="onnx", tp=2))
