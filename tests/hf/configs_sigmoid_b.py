"""Tiny-model config keywords (beyond tiny.GENERIC) for the families in pymoe/hf/families/sigmoid_b.py."""
EXTRA: dict[str, dict] = {}
