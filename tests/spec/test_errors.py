"""Malformed specs: every error names the file, the line and the dotted field.

Each case edits the shipped tiny-scout.yaml; `at` is text found on exactly one line
of the edited file, the line the error must point to.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from l4compile.errors import SpecError
from l4compile.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
MOE_SECTION = """  moe:
    num_experts: 4
    top_k: 1
    intermediate_size: 32
    shared_expert: true
    router_aux_loss_coef: 0.001
"""


@dataclass(frozen=True)
class Bad:
    id: str
    edits: tuple[tuple[str, str], ...]  # (old, new): old occurs exactly once in tiny-scout
    at: str                             # on the line the error points to
    field: str | None
    detail: str                         # part of the message


def bad(id: str, old: str, new: str, at: str, field: str | None, detail: str) -> Bad:
    return Bad(id, ((old, new),), at, field, detail)


CASES = [
    bad("kv_heads_not_divisor", "num_kv_heads: 2", "num_kv_heads: 3", "num_kv_heads: 3",
        "text.attention.num_kv_heads", "divisor of num_heads 4"),
    bad("string_for_int", "num_kv_heads: 2", 'num_kv_heads: "two"', "num_kv_heads",
        "text.attention.num_kv_heads", "expected a positive integer, found 'two' (a string)"),
    bad("bool_is_not_int", "num_heads: 4", "num_heads: true", "num_heads",
        "text.attention.num_heads", "(a boolean)"),
    bad("negative_size", "hidden_size: 64", "hidden_size: -64", "hidden_size",
        "text.hidden_size", "expected a positive integer, found -64"),
    bad("zero_layers", "num_layers: 4", "num_layers: 0", "num_layers", "text.num_layers",
        "found 0"),
    bad("float_for_int", "chunk_size: 8", "chunk_size: 8.5", "chunk_size",
        "text.attention.chunk_size", "expected a positive integer or null, found 8.5"),
    bad("zero_chunk", "chunk_size: 8", "chunk_size: 0", "chunk_size",
        "text.attention.chunk_size", "found 0"),
    bad("heads_times_head_dim", "head_dim: 16", "head_dim: 32", "head_dim",
        "text.attention.head_dim", "num_heads * head_dim == hidden_size 64"),
    Bad("odd_head_dim", (("hidden_size: 64", "hidden_size: 60"), ("head_dim: 16", "head_dim: 15"),
                         ("num_kv_heads: 2", "num_kv_heads: 1")),
        "head_dim", "text.attention.head_dim", "even head_dim"),
    bad("top_k_over_experts", "top_k: 1", "top_k: 5", "top_k", "text.moe.top_k",
        "at most num_experts (4)"),
    bad("nope_layer_out_of_range", "nope_interval: 4", "nope_layers: [1, 4]", "nope_layers",
        "text.layers.nope_layers", "layer indices in [0, 4), found 4"),
    bad("duplicate_moe_layer", "moe_interleave_step: 1",
        "moe_layers:\n      - 0\n      - 2\n      - 0  # again", "# again",
        "text.layers.moe_layers", "layer 0 is listed twice"),
    bad("both_nope_forms", "nope_interval: 4", "nope_interval: 4\n    nope_layers: [3]",
        "nope_layers: [3]", "text.layers.nope_layers", "not both"),
    bad("no_nope_form", "    nope_interval: 4\n", "", "  layers:",
        "text.layers.nope_interval", "missing required field"),
    bad("zero_nope_interval", "nope_interval: 4", "nope_interval: 0", "nope_interval",
        "text.layers.nope_interval", "found 0"),
    bad("zero_moe_step", "moe_interleave_step: 1", "moe_interleave_step: 0",
        "moe_interleave_step", "text.layers.moe_interleave_step", "found 0"),
    Bad("dense_size_needed", (("moe_interleave_step: 1", "moe_interleave_step: 2"),
                              ("  dense_intermediate_size: 128\n", "")),
        "text:", "text.dense_intermediate_size", "layers [0, 2] are dense"),
    bad("moe_section_needed", MOE_SECTION, "", "moe_interleave_step", "text.moe",
        "missing required section"),
    bad("zero_floor_scale", "floor_scale: 4}", "floor_scale: 0}", "floor_scale",
        "text.attention.temperature_tuning.floor_scale", "found 0"),
    bad("temperature_tuning_number", "temperature_tuning: {attn_scale: 0.1, floor_scale: 4}",
        "temperature_tuning: 3", "temperature_tuning", "text.attention.temperature_tuning",
        "expected a mapping {attn_scale, floor_scale}, false or null, found 3"),
    bad("negative_theta", "theta: 500000.0", "theta: -1.0", "theta",
        "text.attention.rope.theta", "expected a positive number, found -1.0"),
    bad("rope_scaling_type", "type: llama3", "type: yarn", "type: yarn",
        "text.attention.rope.scaling.type", "expected 'llama3'"),
    bad("zero_rope_factor", "factor: 16.0", "factor: 0", "factor: 0",
        "text.attention.rope.scaling.factor", "expected a positive number, found 0"),
    bad("negative_low_freq_factor", "low_freq_factor: 1.0", "low_freq_factor: -1.0",
        "low_freq_factor", "text.attention.rope.scaling.low_freq_factor", "found -1.0"),
    bad("string_eps", "rms_norm_eps: 1.0e-5", 'rms_norm_eps: "small"', "rms_norm_eps",
        "text.rms_norm_eps", "expected a positive number, found 'small' (a string)"),
    bad("not_a_bool", "tie_word_embeddings: false", "tie_word_embeddings: maybe",
        "tie_word_embeddings", "text.tie_word_embeddings", "expected true or false"),
    bad("unknown_key", "qk_norm: true", "qk_nrom: true", "qk_nrom",
        "text.attention.qk_nrom", "did you mean 'qk_norm'?"),
    bad("unknown_top_key", "estimate: false", "estimate: false\nvisoin: {}", "visoin",
        "visoin", "did you mean 'vision'?"),
    bad("duplicate_key", "hidden_size: 64", "hidden_size: 64\n  hidden_size: 65",
        "hidden_size: 65", "text.hidden_size", "duplicate key (first given on line 7)"),
    bad("eos_out_of_vocab", "eos: [2]", "eos: [2, 256]", "tokens:", "tokens.eos",
        "token ids in [0, 256) (vocab_size), found 256"),
    bad("negative_bos", "bos: 1,", "bos: -1,", "tokens:", "tokens.bos",
        "expected a non-negative integer or null, found -1"),
    bad("tokens_not_mapping", "tokens: {bos: 1, eos: [2], pad: 0}", "tokens: [1, 2]",
        "tokens:", "tokens", "expected a mapping, found a list"),
    bad("empty_name", "name: tiny-scout", 'name: ""', "name:", "name",
        "expected a non-empty string"),
    bad("missing_name", "name: tiny-scout\n", "", "# A tiny model", "name",
        "missing required field"),
    bad("missing_num_heads", "    num_heads: 4\n", "", "  attention:",
        "text.attention.num_heads", "missing required field"),
    bad("missing_chunk_size", "    chunk_size: 8\n", "", "  attention:",
        "text.attention.chunk_size", "or null for global attention"),
    bad("vision_adapter_input", "tokens:", "vision:\n  intermediate_size: 5000\ntokens:",
        "intermediate_size: 5000", "vision.intermediate_size",
        "expected hidden_size / pixel_shuffle_ratio**2 = 5632"),
    bad("vision_patch_divisor", "tokens:", "vision:\n  patch_size: 15\ntokens:",
        "patch_size: 15", "vision.patch_size", "divisor of image_size 336, found 15"),
    bad("vision_unknown_key", "tokens:", "vision:\n  num_layer: 2\ntokens:", "num_layer: 2",
        "vision.num_layer", "did you mean 'num_layers'?"),
    bad("vision_norm_eps", "tokens:", "vision:\n  norm_eps: 1.0e-6\ntokens:", "norm_eps: 1.0e-6",
        "vision.norm_eps", "expected 1e-05, the eps every LayerNorm of Llama 4's vision tower uses"),
    bad("yaml_syntax", "hidden_size: 64", "hidden_size: 64: 3", "hidden_size", None,
        "invalid YAML: mapping values are not allowed here"),
]


def apply_edits(text: str, edits: tuple[tuple[str, str], ...]) -> str:
    for old, new in edits:
        assert text.count(old) == 1, f"{old!r} must occur once in tiny-scout.yaml"
        text = text.replace(old, new)
    return text


def expected_line(text: str, at: str) -> int:
    lines = [n for n, line in enumerate(text.splitlines(), start=1) if at in line]
    assert len(lines) == 1, f"{at!r} must be on exactly one line, found {lines}"
    return lines[0]


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 24


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_spec(case: Bad, tiny_scout_text: str, write_spec) -> None:
    text = apply_edits(tiny_scout_text, case.edits)
    path = write_spec(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    error, message = info.value, str(info.value)
    line = expected_line(text, case.at)
    field = f" {case.field}:" if case.field else ""
    assert message.startswith(f"{path}:{line}:{field} "), message
    assert case.detail in message
    assert (error.file, error.line, error.field) == (str(path), line, case.field)
    assert error.exit_code == 2


def test_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError, match="spec file not found") as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize("text, line, detail", [
    ("", 1, "the spec is empty"),
    ("# only a comment\n", 1, "the spec is empty"),
    ("- name: x\n- text: y\n", 1, "expected a mapping at the top level, found a list"),
    ("just words\n", 1, "expected a mapping at the top level, found 'just words'"),
    ("name: a\n---\nname: b\n", 2, "invalid YAML"),
    ("name: a\ntext: {hidden_size: 64\n", 3, "invalid YAML"),
])
def test_not_a_spec(text: str, line: int, detail: str, write_spec) -> None:
    path = write_spec(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}:{line}: ")
    assert detail in str(info.value)


CLI_CASES = ["kv_heads_not_divisor", "unknown_key", "yaml_syntax", "missing_name"]


@pytest.mark.parametrize("case_id", CLI_CASES)
def test_cli_reports_one_line(case_id: str, tiny_scout_text: str, write_spec) -> None:
    case = next(c for c in CASES if c.id == case_id)
    text = apply_edits(tiny_scout_text, case.edits)
    path = write_spec(text)
    result = subprocess.run([sys.executable, "-m", "l4compile.cli", "inspect", str(path)],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{path}:{expected_line(text, case.at)}:" in lines[0]
    if case.field:
        assert case.field in lines[0]
