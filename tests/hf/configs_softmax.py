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
}
# family -> the model class tiny.py builds where AutoModel has none for the text config
MODELS: dict[str, str] = {"qwen3_omni_moe": "Qwen3OmniMoeThinkerTextModel"}
