"""Sigmoid 'aux-free' families, second half (convention C2; sigmoid_a.py has the router)."""
from __future__ import annotations

from ._base import Family

FAMILIES: list[Family] = []
