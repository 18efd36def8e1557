"""Tiny-model config keywords (beyond tiny.GENERIC) for the families in pymoe/hf/families/softmax.py."""
EXTRA: dict[str, dict] = {
    "qwen2_moe": {"norm_topk_prob": False},
    "qwen3_moe": {"norm_topk_prob": True},
}
