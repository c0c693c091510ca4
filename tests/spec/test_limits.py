"""Sizes a build cannot hold are refused with one line naming file:line:field; inspect stays arithmetic."""

from __future__ import annotations

import json
import os
import re

import pytest

from l4compile.cli import main
from tests.conftest import spec_path


def mutated(tmp_path, old: str, new: str, name: str = "tiny-scout"):
    text = spec_path(name).read_text()
    assert old in text
    path = tmp_path / "spec.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize("old, new, where", [
    ("num_layers: 4", "num_layers: 1000000000000", r"spec\.yaml:8: text\.num_layers: expected at most 1,024"),
    ("num_layers: 4", "num_layers: 1025", r"spec\.yaml:8: text\.num_layers: expected at most 1,024"),
    ("hidden_size: 64", "hidden_size: 100000000000000000000", r"spec\.yaml:7: text\.hidden_size: expected at most"),
    ("vocab_size: 256", f"vocab_size: {2**63}", r"spec\.yaml:9: text\.vocab_size: expected at most"),
    ("chunk_size: 8", f"chunk_size: {2**40}", r"text\.attention\.chunk_size: expected at most"),
    ("nope_interval: 4", f"nope_interval: {2**64}", r"text\.layers\.nope_interval: expected at most"),
    ("tokens: {bos: 1, eos: [2], pad: 0}", f"tokens: {{bos: 1, eos: [{2**70}], pad: 0}}", r"tokens\.eos"),
    ("intermediate_size: 32", "intermediate_size: 2147483647", None),
])
def test_oversized_fields_are_refused(old, new, where, tmp_path, capsys):
    path = mutated(tmp_path, old, new)
    for argv in (["inspect", str(path)], ["build", str(path), "--dry-run"]):
        code = main(argv)
        err = capsys.readouterr().err
        if where is None:   # large but addressable: inspect answers by arithmetic
            assert code == 0 and err == ""
            break
        assert code == 2 and err.count("\n") == 1, err
        assert re.search(where, err), err


def test_total_size_past_int64_names_the_text_section(tmp_path, capsys):
    path = mutated(tmp_path, "num_experts: 4", "num_experts: 2147483647")
    path.write_text(path.read_text().replace("intermediate_size: 32", "intermediate_size: 2147483647")
                    .replace("vocab_size: 256", "vocab_size: 2147483647"))
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"spec\.yaml:6: text: the model's weights take .* more than a build can address", err), err


def test_inspect_of_the_largest_spec_is_arithmetic(tmp_path, capsys):
    """1024 layers of 1e9-wide experts: no weights, answered at once with exact integers."""
    path = mutated(tmp_path, "num_layers: 4", "num_layers: 1024")
    path.write_text(path.read_text().replace("intermediate_size: 32", "intermediate_size: 1000000000"))
    assert main(["inspect", str(path), "--json", "--context", str(2**40)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["layers"]) == 1024 and report["params_total"] > 9 * 10**14


def test_deeply_nested_yaml_is_one_line(tmp_path, capsys):
    path = tmp_path / "deep.yaml"
    path.write_text("name: " + "[" * 20000 + "]" * 20000 + "\n")
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "deep.yaml: invalid YAML: nested too deeply" in err and err.count("\n") == 1


def test_hf_config_layer_limit(tmp_path):
    from l4compile.errors import SpecError
    from l4compile.hf.config import spec_from_hf_config
    config = {"architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", "num_hidden_layers": 5000}
    with pytest.raises(SpecError, match="num_hidden_layers: expected at most 1,024"):
        spec_from_hf_config(config, "x", "config.json")


def test_a_dry_run_larger_than_any_file_is_one_line(tmp_path, capsys):
    """2**31 - 1 experts fit int64 offsets (213 TB of weights), but not in a file of ext4 (16 TiB): the dry
    run's sparse stand-in for the weights either fits the temporary file system or is one BuildError."""
    path = mutated(tmp_path, "num_experts: 4", "num_experts: 2147483647")
    code = main(["build", str(path), "--dry-run", "-q"])
    err = capsys.readouterr().err
    assert code == 0 or (code == 1 and err.count("\n") == 1 and "model.onnx.data would be 213.31 TB" in err), err


def test_the_sparse_stand_in_names_what_it_could_not_make(tmp_path):
    from l4compile.build import sparse_stand_in
    from l4compile.errors import BuildError
    with pytest.raises(BuildError, match=r"cannot create the dry run's stand-in .*model\.onnx\.data: No such file"):
        sparse_stand_in(tmp_path / "absent" / "model.onnx.data", 1024)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_an_endless_spec_file_is_read_only_so_far(capsys):
    """`inspect /dev/zero` (or a huge file given by mistake) stops at a bound instead of filling memory."""
    assert main(["inspect", "/dev/zero"]) == 2
    err = capsys.readouterr().err
    assert err == "l4compile: error: /dev/zero: larger than 16 MiB: not a spec (the shipped ones are a few KB)\n"
