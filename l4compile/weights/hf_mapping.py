"""Which HF checkpoint tensor feeds which IR parameter, and how (MLC-style mapping).

The lowering says what the model computes; this table says where each weight
comes from. IR linear weights are [in, out]; HF nn.Linear weights are
[out, in], so they are transposed. Stacked experts are already [E, in, out].
"""

from __future__ import annotations

from dataclasses import dataclass

MULTIMODAL_PREFIX = "language_model."
# Tensors of a multimodal checkpoint that the text model does not read (the vision tower is
# compiled on its own), and rotary buffers that old checkpoints carry.
VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")


VISION_LINEARS = ("_proj.weight", ".fc1.weight", ".fc2.weight", ".linear.weight", ".linear_1.weight")


@dataclass(frozen=True)
class TensorMapping:
    ir_name: str
    hf_name: str          # without the multimodal prefix
    transpose: bool       # HF [out, in] <-> IR [in, out]
    text: bool = True     # a text-model tensor (under `language_model.` in a multimodal checkpoint)


def hf_name_of(ir_name: str) -> TensorMapping:
    """The HF tensor behind one IR parameter name."""
    if ir_name.startswith(VISION_PREFIXES):   # the vision graph uses the checkpoint's own names
        return TensorMapping(ir_name, ir_name, transpose=ir_name.endswith(VISION_LINEARS), text=False)
    if ir_name == "lm_head":
        return TensorMapping(ir_name, "lm_head.weight", transpose=True)
    if ir_name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return TensorMapping(ir_name, f"model.{ir_name}", transpose=False)
    is_linear = ir_name.endswith(("_proj", ".router"))
    return TensorMapping(ir_name, f"model.{ir_name}.weight", transpose=is_linear)


def unused_by_text_model(hf_name: str, tie_word_embeddings: bool) -> bool:
    """A checkpoint tensor (full name) that the text model does not bind, by design: the vision
    tower, rotary frequency buffers, and `lm_head.weight` when the embeddings are tied (transformers
    ties it to the input embedding too)."""
    text_name = hf_name[len(MULTIMODAL_PREFIX):] if hf_name.startswith(MULTIMODAL_PREFIX) else hf_name
    return (hf_name.startswith(VISION_PREFIXES) or text_name.endswith("rotary_emb.inv_freq")
            or (tie_word_embeddings and text_name == "lm_head.weight"))
