"""`--target ort-genai`: a build directory that onnxruntime-genai loads as it is.

The model is the text graph lowered for genai's decoder conventions (kv_layout "genai",
l4compile.lower.GENAI_NAMES, l4compile/ir/ops_genai.py) and run through the onnx-cpu passes (MoE
dispatch, int4); beside it genai_config.json (written here) and the tokenizer files the build copies.
genai keeps every layer's whole history in one buffer of `search.max_length` positions per layer
(past_present_share_buffer); chunked layers mask to their chunk in the graph.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from l4compile.errors import BuildError
from l4compile.lower import GENAI_NAMES
from l4compile.spec.model import ModelSpec

TARGET = "ort-genai"
CONFIG_FILE = "genai_config.json"
# search.max_length: genai preallocates this many positions per layer and row at each generation (an app
# raises it with set_search_options(max_length=...), up to the context length).
DEFAULT_MAX_LENGTH = 4096


def check_options(spec: ModelSpec, tp: int, dtype: str) -> None:
    """One line for what this target does not build."""
    if tp > 1:
        raise BuildError(f"--target {TARGET} builds one unsharded model (onnxruntime-genai runs it on one device); "
                         "drop --tp, or use --target trt for a sharded build")
    if dtype == "bfloat16":
        raise BuildError(f"--target {TARGET}: --dtype bfloat16 has no GroupQueryAttention kernel on onnxruntime's "
                         "CPU provider; build float32 or float16")


def text_only(spec: ModelSpec, warn) -> ModelSpec:
    """The spec of what this target builds: the text model. A vision tower is left out, saying so (`warn`)."""
    if spec.vision is None:
        return spec
    warn(f"--target {TARGET} builds the text model only: the vision tower of {spec.name} is not built (prompts "
         "are text; --target onnx builds take images)")
    return dataclasses.replace(spec, vision=None)


def genai_config(spec: ModelSpec, model_file: str, text: dict[str, Any] | None) -> dict[str, Any]:
    """genai_config.json: model type, decoder names and sizes, token ids, search defaults (from the
    checkpoint's generation_config.json where the build has one: `text` is the manifest's)."""
    att, text = spec.attention, text or {}
    eos = list(text.get("stop_tokens") or spec.tokens.eos)
    sampling = text.get("sampling") or {}
    do_sample = bool(sampling.get("temperature"))
    pad = spec.tokens.pad if spec.tokens.pad is not None else eos[0]
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": model_file,
        "head_size": att.head_dim,
        "hidden_size": spec.hidden_size,
        "inputs": {key: GENAI_NAMES[key] for key in ("input_ids", "attention_mask", "past_key_names",
                                                     "past_value_names")},
        "outputs": {key: GENAI_NAMES[key] for key in ("logits", "present_key_names", "present_value_names")},
        "num_attention_heads": att.num_heads,
        "num_hidden_layers": len(spec.layers),
        "num_key_value_heads": att.num_kv_heads,
    }
    return {
        "model": {"bos_token_id": spec.tokens.bos, "context_length": spec.max_position_embeddings, "decoder": decoder,
                  "eos_token_id": eos if len(eos) > 1 else eos[0], "pad_token_id": pad,
                  "type": "llama",   # genai's decoder-only path; the graph carries Llama 4's own attention and MoE
                  "vocab_size": spec.vocab_size},
        "search": {"diversity_penalty": 0.0, "do_sample": do_sample, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": min(spec.max_position_embeddings, DEFAULT_MAX_LENGTH), "min_length": 0,
                   "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
                   "past_present_share_buffer": True, "repetition_penalty": 1.0,
                   "temperature": float(sampling.get("temperature") or 1.0),
                   "top_k": int(sampling.get("top_k") or 0),   # 0: no top-k limit (genai then samples by top_p)
                   "top_p": float(sampling.get("top_p") or 1.0)},
    }


def write_config(spec: ModelSpec, out_dir: Path, model_file: str, text: dict[str, Any] | None) -> str:
    """Write genai_config.json into the build being written; returns its file name."""
    (Path(out_dir) / CONFIG_FILE).write_text(json.dumps(genai_config(spec, model_file, text), indent=2) + "\n")
    return CONFIG_FILE
