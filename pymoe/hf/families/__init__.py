"""The family table: one entry per HF transformers MoE family (pymoe.hf.families() lists them).

Each entry says which block class computes the family's MoE output, which pymoe preset its
default config routes by, its expert form, and how its config and state dict become a
MoELayer. The entries live in one module per routing convention (the survey's C1-C11):
softmax (C1), sigmoid_a and sigmoid_b (C2), others (C3, C4, C10, C11)."""
from __future__ import annotations

from . import others, sigmoid_a, sigmoid_b, softmax
from ._base import Config, Family, Spec

FAMILIES: dict[str, Family] = {
    f.name: f for m in (softmax, sigmoid_a, sigmoid_b, others) for f in m.FAMILIES}
BLOCKS: dict[str, str] = {b: f.name for f in FAMILIES.values() for b in f.blocks}

__all__ = ["BLOCKS", "FAMILIES", "Config", "Family", "Spec"]
