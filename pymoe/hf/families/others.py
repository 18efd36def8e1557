"""Softmax group-limited (C3), softmax + selection bias (C4), and the encoder-decoder
capacity routers (C10 Switch, C11 NLLB)."""
from __future__ import annotations

from ._base import Family

FAMILIES: list[Family] = []
