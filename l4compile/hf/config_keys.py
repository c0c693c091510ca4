"""What the keys of a Llama 4 config.json are to l4compile.

Defaults are transformers' (5.24) own: a key absent from config.json means what
Llama4TextConfig / Llama4VisionConfig give it, so the import reads a config
exactly as `from_pretrained` does. Keys that cannot change the logits of a
forward pass are ignored by name; any other key is an error, so that nothing
that changes the math is ever dropped silently.
"""

from __future__ import annotations

TEXT_DEFAULTS: dict[str, object] = {
    "vocab_size": 202048, "hidden_size": 5120, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
    "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
    "hidden_act": "silu", "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-5,
    "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    "num_experts_per_tok": 1, "num_local_experts": 16, "moe_layers": None, "interleave_moe_layer_step": 1,
    "use_qk_norm": True, "router_aux_loss_coef": 0.001, "rope_parameters": None, "no_rope_layers": None,
    "no_rope_layer_interval": 4, "attention_chunk_size": 8192, "layer_types": None,
    "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1, "attention_bias": False,
    # the pre-5.0 layout of the rotary parameters, still read by transformers 5
    "rope_scaling": None, "rope_theta": 500000.0, "partial_rotary_factor": 1.0,
}

VISION_DEFAULTS: dict[str, object] = {
    "hidden_size": 768, "hidden_act": "gelu", "num_hidden_layers": 34, "num_attention_heads": 16,
    "num_channels": 3, "intermediate_size": 5632, "vision_output_dim": 7680, "image_size": 448,
    "patch_size": 14, "norm_eps": 1e-5, "vision_feature_select_strategy": "default",
    "pixel_shuffle_ratio": 0.5, "projector_input_dim": 4096, "projector_output_dim": 4096,
    "multi_modal_projector_bias": False, "rope_parameters": None, "rope_theta": 10000.0,
    # released configs carry these; transformers 5 does not read them (features come from the last layer)
    "vision_feature_layer": -1, "intermediate_layers_indices": None,
}

MULTIMODAL_DEFAULTS: dict[str, object] = {
    "text_config": None, "vision_config": None, "image_token_index": 200092,
    "boi_token_index": 200080, "eoi_token_index": 200081,
    # read from text_config by transformers' text model; the top-level copies change nothing
    "tie_word_embeddings": False, "pad_token_id": None,
}

# Keys every PreTrainedConfig may carry (transformers 4.x and 5.x), and Llama 4 keys that only
# matter for training, caching, kernels or generation defaults.
GENERIC_KEYS = frozenset("""
    _name_or_path architectures transformers_version model_type dtype torch_dtype use_bfloat16
    output_hidden_states output_attentions return_dict torchscript chunk_size_feed_forward
    is_encoder_decoder is_decoder add_cross_attention cross_attention_hidden_size tie_encoder_decoder
    id2label label2id problem_type finetuning_task tokenizer_class prefix task_specific_params
    pruned_heads tf_legacy_loss max_length min_length do_sample early_stopping num_beams
    num_beam_groups diversity_penalty temperature top_k top_p typical_p repetition_penalty
    length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids
    num_return_sequences output_scores return_dict_in_generate forced_bos_token_id
    forced_eos_token_id remove_invalid_values exponential_decay_length_penalty suppress_tokens
    begin_suppress_tokens sep_token_id decoder_start_token_id _commit_hash
    _attn_implementation _attn_implementation_autoset attn_implementation cache_implementation
    use_cache initializer_range attention_dropout projector_dropout output_router_logits
    router_jitter_noise for_llm_compressor unsloth_fixed unsloth_version
""".split())

# the text-config key each spec field comes from (to name it in errors found by the spec loader)
SPEC_FIELD_KEYS = {
    "text.hidden_size": "hidden_size", "text.num_layers": "num_hidden_layers",
    "text.vocab_size": "vocab_size", "text.rms_norm_eps": "rms_norm_eps",
    "text.max_position_embeddings": "max_position_embeddings",
    "text.dense_intermediate_size": "intermediate_size_mlp",
    "text.attention.num_heads": "num_attention_heads", "text.attention.num_kv_heads": "num_key_value_heads",
    "text.attention.head_dim": "head_dim", "text.attention.chunk_size": "attention_chunk_size",
    "text.attention.temperature_tuning.attn_scale": "attn_scale",
    "text.attention.temperature_tuning.floor_scale": "floor_scale",
    "text.attention.rope.theta": "rope_parameters.rope_theta",
    "text.moe.num_experts": "num_local_experts", "text.moe.top_k": "num_experts_per_tok",
    "text.moe.intermediate_size": "intermediate_size", "text.moe.router_aux_loss_coef": "router_aux_loss_coef",
    "tokens.bos": "bos_token_id", "tokens.eos": "eos_token_id", "tokens.pad": "pad_token_id",
}

# VisionSpec field -> vision_config key
VISION_FIELDS = {
    "image_size": "image_size", "patch_size": "patch_size", "num_channels": "num_channels",
    "hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size", "vision_output_dim": "vision_output_dim",
    "projector_input_dim": "projector_input_dim", "projector_output_dim": "projector_output_dim",
    "pixel_shuffle_ratio": "pixel_shuffle_ratio", "norm_eps": "norm_eps",
}

ROPE_KEYS = frozenset({"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
                       "original_max_position_embeddings", "partial_rotary_factor"})
LAYER_TYPES = ("chunked_attention", "full_attention")
