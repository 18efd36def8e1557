"""Tiny-model config keywords (beyond tiny.GENERIC) for the families in pymoe/hf/families/others.py."""
EXTRA: dict[str, dict] = {}
