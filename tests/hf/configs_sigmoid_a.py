"""Tiny-model config keywords (beyond tiny.GENERIC) for the families in pymoe/hf/families/sigmoid_a.py."""
EXTRA: dict[str, dict] = {
    "deepseek_v3": {"n_group": 4, "topk_group": 2},  # groups exercised: 4 of 2 experts, 2 kept
}
