"""The family table: one entry per HF transformers MoE family (pymoe.hf.families() lists them).

Each entry says which block class computes the family's MoE output, which pymoe preset its
default config routes by, its expert form, and how its config and state dict become a
MoELayer. The entries live in one module per routing convention (the survey's C1-C11), each
with a FAMILIES tuple: softmax (C1), sigmoid_a and sigmoid_b (C2), others (C3, C4, C10, C11),
zero_and_joint (zero-computation experts, the MLP router, C6's joint normalisation, latent MoE).
Every module of this package whose name does not start with "_" is one such group (found by
name, so adding a group is adding its file)."""
from __future__ import annotations

import importlib
import pkgutil

from ._base import Config, Family, Spec

GROUPS: tuple[str, ...] = tuple(sorted(
    m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))
FAMILIES: dict[str, Family] = {
    f.name: f for g in GROUPS for f in importlib.import_module(f"{__name__}.{g}").FAMILIES}
BLOCKS: dict[str, str] = {b: f.name for f in FAMILIES.values() for b in f.blocks}

__all__ = ["BLOCKS", "FAMILIES", "GROUPS", "Config", "Family", "Spec"]
