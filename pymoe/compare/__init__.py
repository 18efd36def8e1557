"""compare(): route the same logits under several presets and show where they differ, and why.

Also from the command line: `python -m pymoe.compare --help`. docs/conventions.md explains each
difference the table reports.
"""
from __future__ import annotations

import sys
import types
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import _checks
from ..routing import Routing, route
from ..variants.presets import Preset, k_mismatch, preset, presets

REASONS = ("expert", "dropped", "gate")  # why a (token, choice) pair differs from the reference
GATE_ATOL = 1e-6  # gates closer than this count as equal


@dataclass(frozen=True)
class PresetSummary:
    """One row of the comparison table."""
    name: str
    capacity: int  # C, slots per expert
    dropped_fraction: float  # share of the T*K (token, choice) pairs dropped
    tokens_lost: int  # tokens that lost every choice (zero MoE output)
    aux_loss: float  # the system's own load-balancing loss value
    differs: dict[str, int]  # reason -> number of pairs that differ from the first preset


@dataclass
class Comparison:
    """What compare() returns. `str(comparison)` is the table.

    Attributes:
        names: the presets, the first one being the reference.
        routings: name -> Routing.
        rows: one PresetSummary per preset.
        reason: name -> `<int8>[T, K]`: 0 the pair (t, j) agrees with the reference, else
            1 + REASONS.index(why): 1 "expert" (another expert chosen), 2 "dropped" (same expert,
            dropped in one routing only), 3 "gate" (same expert, both kept, gates differ by more
            than GATE_ATOL). "expert" wins over the others.
        notes: what the table's reader must know, printed under it (a preset routed at a K its
            gating function is not written for).
    """
    names: list[str]
    routings: dict[str, Routing]
    rows: list[PresetSummary]
    reason: dict[str, np.ndarray] = field(repr=False)
    notes: list[str] = field(default_factory=list)

    def differences(self, name: str) -> list[tuple[int, int, str]]:
        """(token, choice, reason) for every pair of preset `name` that differs from the first."""
        r = self.reason[name]
        return [(int(t), int(j), REASONS[r[t, j] - 1]) for t, j in zip(*np.nonzero(r))]

    def table(self) -> str:
        ref = self.names[0]
        r0 = self.routings[ref]
        head = (f"{len(self.names)} presets on the same logits: T={r0.num_tokens} tokens, "
                f"E={r0.num_experts} experts, K={r0.k}; pairs compared with {ref!r}")
        cols = (f"{'preset':16s} {'C':>5s} {'dropped':>8s} {'tokens lost':>11s} {'aux loss':>9s} "
                f"| {'differ: expert':>14s} {'dropped':>8s} {'gate':>6s}")
        lines = [head, cols, "-" * len(cols)]
        for row in self.rows:
            d = row.differs
            lines.append(f"{row.name:16s} {row.capacity:5d} {row.dropped_fraction:8.1%} "
                         f"{row.tokens_lost:11d} {row.aux_loss:9.4f} | {d['expert']:14d} "
                         f"{d['dropped']:8d} {d['gate']:6d}")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    __str__ = table


def _reasons(ref: Routing, other: Routing) -> np.ndarray:
    """`<int8>[T, K]`: why each (t, j) of `other` differs from `ref` (0 = it does not)."""
    out = np.zeros(ref.expert_index.shape, dtype=np.int8)
    same_expert = ref.expert_index == other.expert_index
    both = same_expert & ref.kept & other.kept
    gate_differs = both & (np.abs(ref.gate - other.gate) > GATE_ATOL)
    out[gate_differs] = 3
    out[same_expert & (ref.kept != other.kept)] = 2
    out[~same_expert] = 1
    return out


def compare(router_logits: np.ndarray, presets: Sequence[str | Preset] | None = None,
            **shared: Any) -> Comparison:
    """Route `router_logits` `[T, E]` under each preset and compare every (token, choice) pair
    with the first preset's.

    Args:
        router_logits: `[T, E]`.
        presets: names or Presets (default: every name in pymoe.presets(), "switch" first).
        shared: route() keywords applied under every preset (explicit keywords win over a
            preset's fields): k (default 2), capacity_factor (default: each preset's own; None
            for dropless), and any other keyword of pymoe.options.RouteOptions.
    Returns:
        a Comparison: per preset the capacity, drop rate, tokens lost and aux loss, and which
        pairs differ from the first preset and why; `print(comparison)` shows the table,
        pymoe.viz.preset_differences draws it.
    """
    if isinstance(presets, (str, Preset)):  # iterating a str would route its letters
        raise TypeError(f"presets: expected a list of names or Presets, got a single "
                        f"{type(presets).__name__} {getattr(presets, 'name', presets)!r} "
                        f"(write [{getattr(presets, 'name', presets)!r}, ...])")
    chosen = [preset(p) for p in (presets if presets is not None else _all())]
    if not chosen:
        raise ValueError("presets: expected at least one preset name")
    names = [p.name for p in chosen]
    if len(set(names)) != len(names):
        raise ValueError(f"presets: each preset once, got {names}")
    k = shared.setdefault("k", 2)
    # one warning and a note under the table, instead of one warning per top-1/top-2 preset
    notes = [k_mismatch(p, k) for p in chosen
             if p.k is not None and isinstance(k, int) and p.k != k]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"preset '.*' is a top-\d gating function")
        routings = {}
        for p in chosen:
            try:
                routings[p.name] = route(router_logits, preset=p, **shared)
            except (TypeError, ValueError) as err:  # which preset could not route these logits
                if "router_logits" in str(err).split(":")[0] or repr(p.name) in str(err):
                    raise
                raise type(err)(f"presets: {p.name!r} cannot route these logits: {err}") from err
    if notes:
        _checks.warn("compare: " + "; ".join(notes))
    ref = routings[names[0]]
    reason = {n: _reasons(ref, r) for n, r in routings.items()}
    rows = [PresetSummary(n, r.capacity, r.dropped_fraction,
                          int(np.count_nonzero(~r.kept.any(axis=1))), r.aux_loss,
                          {why: int(np.count_nonzero(reason[n] == i + 1))
                           for i, why in enumerate(REASONS)})
            for n, r in routings.items()]
    return Comparison(names, routings, rows, reason, notes)


def _all() -> list[str]:
    return presets()


__all__ = ["Comparison", "PresetSummary", "REASONS", "compare"]


class _CallableModule(types.ModuleType):
    """pymoe.compare is this module, and calling it calls compare(): `pymoe.compare(logits, ...)`
    and `pymoe.compare.REASONS` both work, with no function shadowing the module."""

    def __call__(self, router_logits: np.ndarray, presets: Sequence[str | Preset] | None = None,
                 **shared: Any) -> Comparison:
        return compare(router_logits, presets, **shared)


sys.modules[__name__].__class__ = _CallableModule
