"""export-hf: checkpoints written by us load into transformers' Llama4ForCausalLM with the same
logits, from a build directory and from a trained GraphModule; sharding, dtypes, tied embeddings, errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from l4compile.build import BuildOptions, build
from l4compile.emit.torch_module import GraphModule
from l4compile.errors import BuildError, WeightError
from l4compile.hf import HFCheckpoint, load_hf_config, spec_from_hf_config
from l4compile.hf.config import math_fields
from l4compile.hf.export import export_from_build, export_state_dict
from l4compile.lower import lower
from l4compile.runtime import Engine
from l4compile.spec import dump_spec_yaml
from l4compile.weights import RandomWeights
from tests.conftest import load
from tests.hf.conftest import causal_lm, hf_logits, ids_for, save

ATOL = 1e-4


def transformers_logits(checkpoint, ids, dtype=torch.float32) -> np.ndarray:
    from transformers import Llama4ForCausalLM
    return hf_logits(Llama4ForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval(), ids)


def tensor_names(checkpoint) -> set[str]:
    names = set()
    for file in checkpoint.glob("*.safetensors"):
        with safe_open(file, "np") as f:
            names |= set(f.keys())
    return names


def assert_transformers_matches(checkpoint, module: GraphModule, spec) -> np.ndarray:
    """transformers' logits from `checkpoint` equal the module's; returns the ids used."""
    ids = ids_for(spec.vocab_size)
    with torch.no_grad():
        want = module(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(transformers_logits(checkpoint, ids), want, atol=ATOL, rtol=0)
    return ids


def trained_module(spec, steps: int = 2) -> GraphModule:
    """A GraphModule whose weights moved away from their initial values by a few SGD steps."""
    module = GraphModule(lower(spec, kv_cache=False), RandomWeights(4))
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    ids = torch.from_numpy(ids_for(spec.vocab_size, seq=17, seed=5))
    for _ in range(steps):
        logits = module(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, spec.vocab_size), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return module.eval()


def test_build_exports_to_the_checkpoint_it_came_from(tmp_path):
    """HF checkpoint -> build -> export-hf: same tensor names, same config math, same logits."""
    original = save(causal_lm(seed=21, interleave_moe_layer_step=2), tmp_path / "hf")
    config, file = load_hf_config(original)
    spec = spec_from_hf_config(config, "rt", str(file))
    build(spec, tmp_path / "build", HFCheckpoint.for_spec(original, spec), BuildOptions(), log=lambda _: None)
    report = export_from_build(tmp_path / "build", tmp_path / "exported")
    exported = report.out_dir
    assert sorted(report.files) == ["config.json", "model.safetensors"]
    assert tensor_names(exported) == tensor_names(original)
    assert math_fields(spec_from_hf_config(load_hf_config(exported)[0], "rt")) == math_fields(spec)
    ids = ids_for(spec.vocab_size)
    want = Engine.load(tmp_path / "build").logits(ids)
    np.testing.assert_allclose(transformers_logits(exported, ids), want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(transformers_logits(original, ids), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["tiny-scout", "tiny-maverick"])
def test_trained_module_exports_with_the_same_logits(name, tmp_path):
    spec = load(name)
    module = trained_module(spec)
    initial = GraphModule(lower(spec, kv_cache=False), RandomWeights(4)).state_dict()
    assert not torch.equal(module.state_dict()["layers.0.self_attn.q_proj"], initial["layers.0.self_attn.q_proj"])
    export_state_dict(module.state_dict(), spec, tmp_path / "out")
    assert_transformers_matches(tmp_path / "out", module, spec)


def test_large_export_is_sharded_with_an_index(tmp_path):
    spec = load("tiny-maverick")
    module = trained_module(spec, steps=1)
    report = export_state_dict(module.state_dict(), spec, tmp_path / "out", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(f for f in report.files if f.endswith(".safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards) and set(index["weight_map"]) == tensor_names(report.out_dir)
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in module.parameters())
    assert_transformers_matches(tmp_path / "out", module, spec)


def test_tied_embeddings_export_has_no_lm_head(tmp_path):
    spec = dataclasses.replace(load("tiny-scout"), tie_word_embeddings=True)
    module = trained_module(spec, steps=1)
    export_state_dict(module.state_dict(), spec, tmp_path / "out")
    assert "lm_head.weight" not in tensor_names(tmp_path / "out")
    assert_transformers_matches(tmp_path / "out", module, spec)


def test_bfloat16_export(tmp_path):
    spec = load("tiny-maverick")
    state = GraphModule(lower(spec, kv_cache=False), RandomWeights(1)).state_dict()
    export_state_dict(state, spec, tmp_path / "out", dtype="bfloat16")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert q.dtype == torch.bfloat16 and torch.equal(q, state["layers.0.self_attn.q_proj"].t().to(torch.bfloat16))


def test_state_dict_that_does_not_fit_the_spec_is_refused(tmp_path):
    spec = load("tiny-scout")
    state = GraphModule(lower(spec, kv_cache=False), RandomWeights(0)).state_dict()
    missing = {k: v for k, v in state.items() if k != "norm"}
    with pytest.raises(WeightError, match="missing tensor norm"):
        export_state_dict(missing, spec, tmp_path / "a")
    with pytest.raises(WeightError, match="unexpected tensor layers.9.extra"):
        export_state_dict({**state, "layers.9.extra": torch.zeros(1)}, spec, tmp_path / "b")
    with pytest.raises(WeightError, match=r"tensor norm: shape \[3\], the spec needs \[64\]"):
        export_state_dict({**state, "norm": torch.zeros(3)}, spec, tmp_path / "c")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_refuses_to_overwrite_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    spec = load("tiny-scout")
    state = GraphModule(lower(spec, kv_cache=False), RandomWeights(0)).state_dict()
    with pytest.raises(BuildError, match="holds notes.txt, which an export does not write; refusing"):
        export_state_dict(state, spec, tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    (tmp_path / "out" / "notes.txt").unlink()
    for _ in range(2):  # an earlier export is replaced
        export_state_dict(state, spec, tmp_path / "out", max_shard_bytes=10**5 if _ else 10**9)
    assert "model.safetensors" not in {p.name for p in (tmp_path / "out").iterdir()}


def cli(*args):
    return subprocess.run([sys.executable, "-m", "l4compile.cli", *map(str, args)], capture_output=True, text=True)


def test_cli_export_from_state_dict_file_and_build(tmp_path):
    spec = load("tiny-maverick")
    module = trained_module(spec, steps=1)
    torch.save(module.state_dict(), tmp_path / "trained.pt")
    (tmp_path / "spec.yaml").write_text(dump_spec_yaml(spec))
    r = cli("export-hf", tmp_path / "trained.pt", "--spec", tmp_path / "spec.yaml", "-o", tmp_path / "ckpt")
    assert r.returncode == 0, r.stderr
    ids = assert_transformers_matches(tmp_path / "ckpt", module, spec)
    with torch.no_grad():
        want = module(torch.from_numpy(ids)).numpy()
    # and back in: import-hf, build from the exported checkpoint, export the build again
    assert cli("import-hf", tmp_path / "ckpt", "-o", tmp_path / "again.yaml").returncode == 0
    r = cli("build", tmp_path / "again.yaml", "--weights", tmp_path / "ckpt", "-o", tmp_path / "build")
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(Engine.load(tmp_path / "build").logits(ids), want, atol=ATOL, rtol=0)
    r = cli("export-hf", tmp_path / "build", "-o", tmp_path / "ckpt2", "--max-shard-size", "50KB")
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(transformers_logits(tmp_path / "ckpt2", ids), want, atol=ATOL, rtol=0)


def test_cli_export_errors_are_one_line(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "spec.yaml").write_text(dump_spec_yaml(load("tiny-scout")))
    for args, code, words in (
            (["export-hf", tmp_path / "junk.pt", "-o", tmp_path / "o"], 1, "needs --spec"),
            (["export-hf", tmp_path / "junk.pt", "--spec", tmp_path / "spec.yaml", "-o", tmp_path / "o"], 1,
             "not a torch state_dict"),
            (["export-hf", tmp_path / "nowhere", "-o", tmp_path / "o"], 1, "expected a build directory")):
        r = cli(*args)
        assert r.returncode == code and words in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
