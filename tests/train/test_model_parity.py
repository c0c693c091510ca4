"""The training model against transformers' Llama4ForCausalLM and against the reference GraphModule, on the
same weights (strong random draws, as in tests/hf): fp32 loss within 1e-5, every parameter's gradient
within 1e-4 of its largest entry, 40-token sequences over chunk 8 (five chunks, temperature floor 4)."""

from __future__ import annotations

import pytest
import torch

from l4compile.emit.torch_module import GraphModule
from l4compile.hf import HFCheckpoint, load_hf_config, spec_from_hf_config
from l4compile.lower import lower
from l4compile.train.loss import IGNORE_INDEX, cross_entropy_sum, labelled_tokens
from l4compile.train.model import Llama4ForTraining
from l4compile.train.weights import ir_state_dict, load_weights
from tests.hf.conftest import causal_lm, ids_for, save

CASES = {
    "scout-like": dict(interleave_moe_layer_step=1, use_qk_norm=True),
    "maverick-like": dict(interleave_moe_layer_step=2, use_qk_norm=False, num_key_value_heads=1),
    "top2-tied": dict(num_experts_per_tok=2, tie_word_embeddings=True, num_key_value_heads=4),
}


def _ours_from(checkpoint):
    config, file = load_hf_config(checkpoint)
    spec = spec_from_hf_config(config, "train-parity", str(file))
    model = Llama4ForTraining(spec)
    load_weights(model, HFCheckpoint.for_spec(checkpoint, spec), spec)
    return spec, model


def _labels(ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[1, -7:] = IGNORE_INDEX  # a padded tail: ignored, as transformers ignores -100
    return labels


def _loss(model, ids, labels):
    logits, _ = model(ids)
    return cross_entropy_sum(logits, labels) / labelled_tokens(labels)


def _assert_grads_close(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    for name, expected in theirs.items():
        scale = expected.abs().max()
        assert scale > 0, name
        err = (ours[name] - expected).abs().max() / scale
        assert err <= 1e-4, f"{name}: gradient differs by {err:.2e} of its largest entry"


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_match_transformers(case, tmp_path):
    reference = causal_lm(seed=len(case), **CASES[case])
    reference.config._attn_implementation = "eager"
    reference.train()
    spec, model = _ours_from(save(reference, tmp_path / "hf"))
    ids = torch.from_numpy(ids_for(spec.vocab_size))
    labels = _labels(ids)
    theirs = reference(input_ids=ids, labels=labels).loss
    theirs.backward()
    ours = _loss(model, ids, labels)
    ours.backward()
    assert abs(ours.item() - theirs.item()) <= 1e-5, (ours.item(), theirs.item())
    _assert_grads_close({n: p.grad for n, p in model.named_parameters()},
                        {n: p.grad for n, p in reference.named_parameters()})


def test_matches_reference_graph_module(tmp_path):
    """Same function as the op set's reference (every expert on every token, masked attention)."""
    reference = causal_lm(seed=3)
    spec, model = _ours_from(save(reference, tmp_path / "hf"))
    graph_module = GraphModule(lower(spec, kv_cache=False), HFCheckpoint(tmp_path / "hf"))
    assert set(ir_state_dict(model.state_dict(), spec)) == set(dict(graph_module.named_parameters()))
    ids = torch.from_numpy(ids_for(spec.vocab_size, seq=37))  # not a multiple of the chunk
    ids[ids == spec.tokens.pad] = 3  # the reference has no padding_idx: the pad row's gradient would differ
    labels = _labels(ids)
    ours = _loss(model, ids, labels)
    ours.backward()
    ref = cross_entropy_sum(graph_module(ids), labels) / labelled_tokens(labels)
    ref.backward()
    assert abs(ours.item() - ref.item()) <= 1e-5
    ours_ir = ir_state_dict({n: p.grad for n, p in model.named_parameters()}, spec)
    _assert_grads_close(ours_ir, {n: p.grad for n, p in graph_module.named_parameters()})


def test_activation_checkpointing_changes_nothing(tmp_path):
    from l4compile.train.parallel import apply_activation_checkpointing
    spec, model = _ours_from(save(causal_lm(seed=5), tmp_path / "hf"))
    _, checkpointed = _ours_from(tmp_path / "hf")
    apply_activation_checkpointing(checkpointed)
    ids = torch.from_numpy(ids_for(spec.vocab_size))
    labels = _labels(ids)
    for m in (model, checkpointed):
        _loss(m, ids, labels).backward()
    assert list(dict(checkpointed.named_parameters())) == list(dict(model.named_parameters()))
    _assert_grads_close({n: p.grad for n, p in checkpointed.named_parameters()},
                        {n: p.grad for n, p in model.named_parameters()})
