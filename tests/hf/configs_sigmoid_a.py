"""Tiny-model config keywords (beyond tiny.GENERIC) for the families in pymoe/hf/families/sigmoid_a.py."""
_MLA = {"num_key_value_heads": 4, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
        "q_lora_rank": 16, "kv_lora_rank": 16}  # MLA attention, small
_DSA = {**_MLA, "index_head_dim": 16, "index_n_heads": 2, "index_topk": 4}  # + its sparse indexer
EXTRA: dict[str, dict] = {
    "deepseek_v3": {"n_group": 4, "topk_group": 2},  # groups exercised: 4 of 2 experts, 2 kept
    "afmoe": {"num_dense_layers": 1, "num_shared_experts": 2, "route_scale": 2.0},
    "axk1": {"n_group": 4, "topk_group": 2, "mlp_layer_types": ["dense", "sparse"]},
    "axk2": {**_MLA, "mlp_layer_types": ["sparse", "sparse"]},  # n_group None: groups off
    "bailing_hybrid": {"n_group": 4, "topk_group": 2, "mlp_layer_types": ["sparse", "sparse"]},
    "beam": {"n_group": 4, "topk_group": 2, "mlp_layer_types": ["sparse", "sparse"]},
    "deepseek_v32": {**_DSA, "n_group": 4, "topk_group": 2},
    "dots1": {"n_shared_experts": 2, "norm_topk_prob": True, "routed_scaling_factor": 2.5},
    "dots3_note": {"num_key_value_heads": 4, "vision_config": {"adapter_out_dim": 32},
                   "audio_config": {"adapter_out_dim": 32}, "shared_experts_intermediate_size": 24,
                   "n_shared_experts": 2, "mlp_layer_types": ["sparse", "sparse"]},
    "exaone_moe": {"mlp_layer_types": ["sparse", "sparse"]},
    "flint": {"mlp_only_layers": [], "shared_expert_intermediate_size": 48},
    "glm4_moe": {},
    "glm4_moe_lite": {**_MLA, "mlp_layer_types": ["sparse", "sparse"]},
    "glm4v_moe": {"head_dim": 128},
    "glm5_next": {"num_key_value_heads": 4, "qk_rope_head_dim": 0, "num_hidden_layers": 1,
                  "mlp_layer_types": ["sparse"], "swiglu_limit": 1.5},
    "glm_moe_dsa": {**_DSA, "mlp_layer_types": ["sparse", "sparse"]},
}
