"""Tiny-model config keywords (beyond tiny.GENERIC) for the families in pymoe/hf/families/softmax.py."""
EXTRA: dict[str, dict] = {
    "qwen2_moe": {"norm_topk_prob": False},
    "qwen3_moe": {"norm_topk_prob": True},
    "flex_olmo": {"norm_topk_prob": False},  # FlexOlmo-7x7B's setting
    "mellum": {"norm_topk_prob": True},
    "qwen3_omni_moe": {"norm_topk_prob": True},
    "qwen3_next": {"norm_topk_prob": True},
    "qwen4_exp": {"norm_topk_prob": True},
    "lara_mini": {"norm_topk_prob": True},
    "aria": {"moe_topk": 2, "moe_num_shared_experts": 2},
    "cohere2_moe": {"num_shared_experts": 1, "shared_expert_combination_strategy": "average"},
    "hunyuan_v1_moe": {"moe_topk": 2},
    "granitemoeshared": {"shared_intermediate_size": 48},
    "granitemoe_swa": {"shared_intermediate_size": 48},
    "granitemoehybrid": {"shared_intermediate_size": 48, "mamba_n_heads": 4, "mamba_d_head": 16,
                         "mamba_d_state": 8, "mamba_chunk_size": 8,
                         "layer_types": ["mamba", "attention"]},
    "gpt_oss": {"swiglu_limit": 1.5},  # a limit the random pre-activations cross
    "openai_privacy_filter": {"swiglu_limit": 1.5},
    "dbrx": {"n_layers": 2, "d_model": 32, "n_heads": 4,
             "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": 64, "moe_num_experts": 8, "moe_top_k": 2,
                            "moe_normalize_expert_weights": 1.0}},
}
# family -> the model class tiny.py builds where AutoModel has none for the text config
MODELS: dict[str, str] = {"qwen3_omni_moe": "Qwen3OmniMoeThinkerTextModel"}

# family -> (decoder layer, x) -> the layer's MoE branch, for the families whose block is the
# decoder layer (the shared MLP lives there): what pymoe reproduces, without attention and norms
BRANCHES = {name: (lambda layer, x: layer.block_sparse_moe(x) + layer.shared_mlp(x))
            for name in ("granitemoeshared", "granitemoe_swa", "granitemoehybrid")}
