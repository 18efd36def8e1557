"""Steps 8-9 of routing: how many slots each expert has, and which (token, choice) pairs drop."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from . import _checks


def expert_load(expert_index: np.ndarray, num_experts: int) -> np.ndarray:
    """How many (token, choice) pairs chose each expert, before dropping.

    Args:
        expert_index: `<int>[T, K]`.
    Returns:
        `<int64>[E]`, summing to T*K.
    """
    return np.bincount(expert_index.reshape(-1), minlength=num_experts).astype(np.int64)  # [E]


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float | None,
                    min_capacity: int = 0, load: np.ndarray | None = None) -> int:
    """Step 8: slots per expert, C.

    C = ceil(K * T * capacity_factor / E), then raised to min_capacity and clipped to T. The
    product is taken exactly, on capacity_factor's decimal value as Python prints it: 1.1 means
    11/10, so T=100, E=10, K=1 gives C = 11 (float arithmetic would give 110.00000000000001 / 10
    and round up to 12). The fair share of an expert is K*T/E assignments, so
    capacity_factor = 1 leaves no slack. This is the DeepSpeed / Megatron-Core form (it includes
    K and rounds up); Mesh-TF and flaxformer leave K out and floor or round, Tutel floors
    (research/routing-conventions.md, row 19). No expert can receive more than T assignments
    (a token picks an expert at most once), so C = T never drops anything.

    capacity_factor=None means dropless: C = the largest expert load (`load` required), at least
    min_capacity, at most T.
    """
    num_tokens = _checks.integer("num_tokens", num_tokens, low=0)
    num_experts = _checks.integer("num_experts", num_experts, low=1)
    k = _checks.integer("k", k, low=1, high=num_experts)
    capacity_factor = _checks.positive_finite("capacity_factor", capacity_factor, allow_none=True)
    min_capacity = _checks.integer("min_capacity", min_capacity, low=0)
    if capacity_factor is None:
        if load is None:
            raise ValueError("load: required when capacity_factor is None (dropless routing)")
        c = int(load.max()) if load.size else 0
    else:
        c = math.ceil(k * num_tokens * Fraction(repr(capacity_factor)) / num_experts)
    return min(max(c, min_capacity), num_tokens)


def drop(position: np.ndarray, gate: np.ndarray,
         capacity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 9: drop every (token, choice) whose position is past capacity.

    Args:
        position: `<int64>[T, K]` from position_in_expert (all >= 0).
        gate: `[T, K]` from gates.
        capacity: C.
    Returns:
        (position `[T, K]` with -1 where dropped, gate `[T, K]` with 0 where dropped,
         kept `<bool>[T, K]`). The kept pairs of each expert are exactly its first C in priority
        order. The surviving gates are not renormalised (see topk.gates). A token with every
        choice dropped gets a zero output from the MoE layer; the residual around it carries it.
    """
    kept = position < capacity  # [T, K]
    return np.where(kept, position, -1), np.where(kept, gate, 0).astype(gate.dtype), kept


def slot_owner(expert_index: np.ndarray, position: np.ndarray, capacity: int,
               num_experts: int) -> np.ndarray:
    """The inverse of (expert_index, position): who sits in each expert slot.

    Args:
        expert_index, position: `[T, K]`, position -1 where dropped.
    Returns:
        `<int64>[E, C]`: t*K + j for the kept pair (t, j) in slot (e, c), or -1 for an empty slot.
        Kept slots of expert e are 0 .. n_e - 1 (filled from the front), so row e is
        [owners..., -1, -1, ...]. Dispatch kernels loop over this so that each output row is
        written by exactly one thread.
    """
    T, K = position.shape
    owner = np.full((num_experts, capacity), -1, dtype=np.int64)  # [E, C]
    kept = position >= 0  # [T, K]
    flat = np.arange(T * K, dtype=np.int64).reshape(T, K)  # [T, K] = t*K + j
    owner[expert_index[kept], position[kept]] = flat[kept]
    return owner
