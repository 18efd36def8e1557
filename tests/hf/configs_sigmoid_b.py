"""Tiny-model config keywords (beyond tiny.GENERIC) for the families in pymoe/hf/families/sigmoid_b.py."""
_GROUPS = {"n_group": 4, "topk_group": 2}  # groups exercised: 4 of 2 experts, 2 kept

EXTRA: dict[str, dict] = {
    "hy_v3": {},
    "hy_v4": {**_GROUPS, "swiglu_limit": 1.0},  # a limit the tiny gates reach
    "hy_v4_vl": {**_GROUPS, "swiglu_limit": 1.0, "num_key_value_heads": 4, "qk_rope_head_dim": 64},
    "inkling2": {},
    "inkling2_loop": {},
    "kimi_linear": {**_GROUPS},
    "laguna": {},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 0},
    "llama4": {},
    "mimo_v2_flash": {**_GROUPS},
    "minimax_m2": {},
    "minimax_m3_vl": {"shared_intermediate_size": 48, "swiglu_limit": 1.0},
    "nemotron_h": {**_GROUPS, "moe_shared_expert_intermediate_size": 48},
    "solar_open": {**_GROUPS},
    # the same limits on both layers: the block does not know its layer index
    "step3p7": {"sliding_window": 16, "mlp_layer_types": ["sparse", "sparse"],
                "share_expert_dim": 48, "swiglu_limits": [0.5, 0.5],
                "swiglu_limits_shared": [0.4, 0.4]},
}

# family -> the transformers model class to build (AutoModel has none for the text config)
MODELS: dict[str, str] = {"step3p7": "Step3p7TextModel"}

_INKLING_F64 = ("HF bug: {}TopKRouter casts its input to float32 (hidden_states.float()) but "
                "not its weight, so a float64 block raises 'expected m1 and m2 to have the same "
                "dtype' in F.linear")
# family -> {dtype name: reason}: HF's own block cannot run in that dtype
XFAIL: dict[str, dict[str, str]] = {
    "inkling2": {"float64": _INKLING_F64.format("Inkling2")},
    "inkling2_loop": {"float64": _INKLING_F64.format("Inkling2Loop")},
}

# family -> (forward, gradients) relative tolerances, where a family cannot meet tiny.TOL
# (lfm2_moe's sum + 1e-6 is normalize_eps=1e-6 now: it meets the default)
TOL: dict[str, dict] = {}
