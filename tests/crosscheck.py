"""Shared pieces of the cross-checks against other systems' routing code (docs/conventions.md).

Every system's result is brought to one form, an Outcome of [T, E] arrays (which experts each
token chose, which of those pairs kept a slot, the gate of each kept pair), plus the [T, E, C]
combine tensor, the load-balancing loss and the capacity where the system exposes them. pymoe's
Routing is brought to the same form, and assert_same compares the two:
  - chosen experts and kept pairs: exactly;
  - gates, combine weights: max |ours - theirs| <= TOL[dtype] * max(1, max |theirs|);
  - aux loss: |ours - theirs| <= aux_tol(dtype, T) * max(1, |theirs|).
TOL is 1e-6 in float32 and 1e-12 in float64: a gate is a softmax entry and at most one division
on each side, a few roundings each (about 8 float32 ulps at 1.0 leaves room for them). An aux loss
sums T products in another order on each side (torch's vectorised reductions depend on the CPU,
NumPy's on its SIMD loops), whose difference is bounded by about 2 T eps: aux_tol is the larger of
TOL and that bound. The largest differences seen are kept in
MEASURED, so a run can report them (`python tests/crosscheck.py` runs every cross-check and
prints them).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import pymoe

TOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}
MEASURED: dict[str, float] = {}  # "system/dtype/what" -> largest scaled difference seen


@dataclass
class Outcome:
    chosen: np.ndarray  # <bool>[T, E] the experts each token chose, before capacity
    kept: np.ndarray  # <bool>[T, E] chosen pairs that kept a slot
    gate: np.ndarray  # <float64>[T, E] gate of each kept pair, 0 elsewhere
    combine: np.ndarray | None = None  # [T, E, C]
    aux: float | None = None
    capacity: int | None = None


def outcome(r: pymoe.Routing) -> Outcome:
    """pymoe's Routing in the common form."""
    T, E = r.probs.shape
    chosen = np.zeros((T, E), bool)
    kept = np.zeros((T, E), bool)
    gate = np.zeros((T, E))
    rows = np.repeat(np.arange(T), r.k)
    chosen[rows, r.expert_index.ravel()] = True
    kept[rows, r.expert_index.ravel()] = r.kept.ravel()
    gate[rows, r.expert_index.ravel()] = np.where(r.kept, r.gate, 0).ravel()
    return Outcome(chosen, kept, gate, r.combine_weights, r.aux_loss, r.capacity)


def _record(key: str, value: float) -> None:
    MEASURED[key] = max(MEASURED.get(key, 0.0), value)


def _scaled(ours: np.ndarray, theirs: np.ndarray) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    if ours.size == 0:
        return 0.0
    return float(np.max(np.abs(ours - theirs)) / max(1.0, float(np.max(np.abs(theirs)))))


def aux_tol(dtype, T: int) -> float:
    """The aux-loss tolerance: TOL, or two sums of T terms in different orders (2 T eps)."""
    return max(TOL[np.dtype(dtype)], 2 * T * float(np.finfo(dtype).eps))


def assert_same(ours: Outcome, theirs: Outcome, dtype, system: str, *,
                rows: np.ndarray | None = None, aux_dtype=None) -> None:
    """ours == theirs within the cross-check tolerance of `dtype`. rows: compare only these tokens
    (where a system breaks a tie in no documented order; see the callers). aux_dtype: the dtype
    the system computes its aux loss in, where that is narrower (HF sums it in float32)."""
    tol = TOL[np.dtype(dtype)]
    sel = slice(None) if rows is None else rows
    key = f"{system}/{np.dtype(dtype).name}"
    np.testing.assert_array_equal(ours.chosen[sel], theirs.chosen[sel], f"{system}: chosen experts")
    np.testing.assert_array_equal(ours.kept[sel], theirs.kept[sel], f"{system}: kept pairs")
    d = _scaled(ours.gate[sel], theirs.gate[sel])
    _record(f"{key}/gate", d)
    assert d <= tol, f"{system}: gates differ by {d:.3g} > {tol:g}"
    if theirs.capacity is not None:
        assert ours.capacity == theirs.capacity, f"{system}: capacity {ours.capacity} vs {theirs.capacity}"
    if theirs.combine is not None:
        assert ours.combine.shape == theirs.combine.shape, (
            f"{system}: combine shape {ours.combine.shape} vs {theirs.combine.shape}")
        d = _scaled(ours.combine[sel], theirs.combine[sel])
        _record(f"{key}/combine", d)
        assert d <= tol, f"{system}: combine weights differ by {d:.3g} > {tol:g}"
    if theirs.aux is not None:
        d = abs(ours.aux - theirs.aux) / max(1.0, abs(theirs.aux))
        _record(f"{key}/aux", d)
        tol = aux_tol(aux_dtype or dtype, ours.chosen.shape[0])
        assert d <= tol, f"{system}: aux loss {ours.aux!r} vs {theirs.aux!r} ({d:.3g} > {tol:g})"


def combine_from_slots(kept: np.ndarray, gate: np.ndarray, order: str, capacity: int) -> np.ndarray:
    """[T, E, C] combine tensor of systems that return only kept pairs and gates [T, E] and fill
    each expert's slots in token order (order="token": Megatron, MegaBlocks, HF)."""
    assert order == "token"
    T, E = kept.shape
    out = np.zeros((T, E, capacity))
    slot = np.cumsum(kept, axis=0) - 1  # [T, E]
    t, e = np.nonzero(kept)
    out[t, e, slot[t, e]] = gate[t, e]
    return out


def ours(system: str, logits: np.ndarray, k: int, capacity_factor: float | None,
         min_capacity: int | None = None, **overrides) -> Outcome:
    """pymoe's routing of `logits` under `system`'s preset, in the common form (min_capacity None:
    the preset's)."""
    if min_capacity is not None:
        overrides["min_capacity"] = min_capacity
    return outcome(pymoe.route(logits, k, capacity_factor, preset=system, **overrides))


# ------------------------------------------------------------------------------ logits cases

def random_logits(T: int, E: int, dtype, seed: int = 0) -> np.ndarray:
    """[T, E] standard normal logits: balanced on average, no ties."""
    return np.random.default_rng(seed).normal(size=(T, E)).astype(dtype)


def skewed_logits(T: int, E: int, dtype, seed: int = 1) -> np.ndarray:
    """[T, E] logits favouring low experts (expert e shifted by -0.6 e): forces drops at cf ~ 1."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(T, E)) - 0.6 * np.arange(E)).astype(dtype)


def tied_logits(T: int, E: int, dtype, seed: int = 2, k: int | None = None) -> np.ndarray:
    """[T, E] small-integer logits with exact ties: equal scores inside rows (experts tie) and
    repeated rows (tokens tie for a slot), so the lower-index rules decide.

    k=None: any ties, for systems that select with argmax (first maximum = lower expert).
    k given: the K best of each row are strictly above the rest (ties inside the K best and below
    them, never across the K-th place), for systems that select with torch.topk, whose order
    among equal values is undocumented (see boundary_tied).
    """
    rng = np.random.default_rng(seed)
    u = max(T // 4, 1)  # u distinct rows, each repeated
    if k is None:
        rows = rng.integers(0, 3, size=(u, E)).astype(np.float64)
    else:
        rows = rng.integers(0, 2, size=(u, E)).astype(np.float64)  # 0 or 1 below the top
        for r in rows:
            r[rng.permutation(E)[:k]] = rng.integers(3, 5, size=k)  # 3 or 4 in the top K
    return np.tile(rows, (T // u + 1, 1))[:T][rng.permutation(T)].astype(dtype)


def boundary_tied(scores: np.ndarray, k: int) -> np.ndarray:
    """<bool>[T]: tokens whose K-th and (K+1)-th best score are equal. torch.topk (which Mixtral,
    Qwen, OLMoE, gpt-oss, DeepSeek-V3, DeepSpeed topkgating and Megatron select with) breaks such
    ties in no documented order; pymoe takes the lower expert."""
    s = -np.sort(-np.asarray(scores, np.float64), axis=1)
    if k >= s.shape[1]:
        return np.zeros(s.shape[0], bool)
    return s[:, k - 1] == s[:, k]


CASES = {"random": random_logits, "skewed": skewed_logits, "ties": tied_logits}


if __name__ == "__main__":  # run every cross-check and print the largest differences measured
    import sys

    import pytest

    here = __import__("os").path.dirname(__file__)
    rc = pytest.main(["-q", "-p", "no:cacheprovider", here, "-k", "crosscheck"])
    measured = sys.modules["crosscheck"].MEASURED  # the copy the tests imported
    for key in sorted(measured):
        print(f"{key:36s} {measured[key]:.3g}")
    sys.exit(rc)
