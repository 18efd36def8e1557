"""Steps 8-9 of routing: how many slots each expert has, and which (token, choice) pairs drop."""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np

from . import _checks

# a pymoe.options.RouteOptions (not imported: pymoe.options imports this module)
Options = Any


def expert_load(expert_index: np.ndarray, num_experts: int) -> np.ndarray:
    """How many (token, choice) pairs chose each expert, before dropping.

    Args:
        expert_index: `<int>[T, K]`.
    Returns:
        `<int64>[E]`, summing to T*K.
    """
    return np.bincount(expert_index.reshape(-1), minlength=num_experts).astype(np.int64)  # [E]


CAPACITY_RULES = ("k_ceil", "floor", "round", "tutel", "k_floor")


def capacity_args(capacity_factor: object, min_capacity: object = 0, rule: object = "k_ceil",
                  capacity: object = None) -> tuple[float | None, int, str, int | None]:
    """The capacity settings, checked: (capacity_factor > 0 and finite or None, min_capacity >= 0,
    rule in CAPACITY_RULES, capacity >= 0 or None). The one check of them, for expert_capacity
    and for route()'s keywords (options.route_options), which MoELayer checks at construction."""
    return (_checks.positive_finite("capacity_factor", capacity_factor, allow_none=True),
            _checks.integer("min_capacity", min_capacity, low=0),
            _checks.choice("capacity_rule", rule, CAPACITY_RULES),
            None if capacity is None else _checks.integer("capacity", capacity, low=0))


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float | None,
                    min_capacity: int = 0, load: np.ndarray | None = None, *,
                    rule: str = "k_ceil", capacity: int | None = None) -> int:
    """Step 8: slots per expert, C.

    rule (each system's formula; docs/variants.md):
        "k_ceil" (default; DeepSpeed, Megatron-Core): C = ceil(K * T * capacity_factor / E).
            The fair share of an expert is K*T/E assignments, so capacity_factor = 1 leaves no
            slack.
        "floor" (Mesh-TF): C = floor(T * capacity_factor / E), no K: top-2 configurations use
            capacity_factor 1.25-2 and expect second choices to overflow.
        "round" (flaxformer): C = round(T * capacity_factor / E), halves to even (jnp.round).
        "tutel" (Tutel): C = K * floor(capacity_factor * ceil(T / E)).
        "k_floor" (MegaBlocks): C = floor(K * T * capacity_factor / E).
    capacity: a fixed integer C (HF Switch's expert_capacity) instead of any formula; then
        capacity_factor is ignored.
    Every product is taken exactly, on capacity_factor's decimal value as Python prints it: 1.1
    means 11/10, so T=100, E=10, K=1 gives C = 11 with "k_ceil" (float arithmetic would give
    110.00000000000001 / 10 and round up to 12). The result is then raised to min_capacity and
    clipped to T: no expert can receive more than T assignments (a token picks an expert at most
    once), so C = T never drops anything.

    capacity_factor=None means dropless: C = the largest expert load (`load` required), at least
    min_capacity, at most T.
    """
    num_tokens = _checks.integer("num_tokens", num_tokens, low=0)
    num_experts = _checks.integer("num_experts", num_experts, low=1)
    k = _checks.integer("k", k, low=1, high=num_experts)
    capacity_factor, min_capacity, rule, capacity = capacity_args(capacity_factor, min_capacity,
                                                                  rule, capacity)
    if capacity is not None:
        c = capacity
    elif capacity_factor is None:
        if load is None:
            raise ValueError("load: required when capacity_factor is None (dropless routing)")
        c = int(load.max()) if load.size else 0
    else:
        c = capacity_formula(num_tokens, num_experts, k, capacity_factor, rule)
    return min(max(c, min_capacity), num_tokens)


def capacity_formula(T: int, E: int, k: int, capacity_factor: float, rule: str) -> int:
    """The capacity formula `rule` of expert_capacity, before min_capacity and the clip to T,
    in exact rational arithmetic on capacity_factor's decimal value."""
    cf = Fraction(repr(float(capacity_factor)))
    if rule == "k_ceil":
        return math.ceil(k * T * cf / E)
    if rule == "floor":
        return math.floor(T * cf / E)
    if rule == "round":
        return round(T * cf / E)  # Fraction rounds halves to even, like jnp.round
    if rule == "k_floor":
        return math.floor(k * T * cf / E)
    return k * math.floor(cf * -(-T // E))  # tutel: ceil(T / E) in integers


def capacity_of(T: int, E: int, opts: Options, load: np.ndarray | None = None) -> int:
    """expert_capacity with the options' capacity keywords (pymoe.options.RouteOptions)."""
    return expert_capacity(T, E, opts.k, opts.capacity_factor, opts.min_capacity, load,
                           rule=opts.capacity_rule, capacity=opts.capacity)


def capacity_for(T: int, E: int, expert_index: np.ndarray, candidates: np.ndarray | None,
                 opts: Options) -> int:
    """Step 8 with the options' rule. Expert choice gets an error, not a clip, above T."""
    if opts.selection == "experts":
        if opts.capacity is not None:
            c, name = opts.capacity, "capacity"
        else:  # route_options refuses expert choice without a capacity or a factor
            assert opts.capacity_factor is not None
            c = capacity_formula(T, E, opts.k, opts.capacity_factor, opts.capacity_rule)
            name = "capacity_factor"
        c = max(c, opts.min_capacity)
        if c > T:
            raise ValueError(f"{name}: expert choice gives each expert its top-C tokens, so C "
                             f"must be <= T = {T}; got C = {c}")
        return c
    chosen = expert_index if candidates is None else expert_index[candidates]
    return capacity_of(T, E, opts, expert_load(chosen, E))  # load: for dropless routing


def capacity_words(opts: list[Options]) -> tuple[set, set, set]:
    """The fixed capacities, the capacity factors and the minimum capacities of `opts`, each as
    a set (for pymoe.viz.capacity_setting)."""
    return ({o.capacity for o in opts}, {o.capacity_factor for o in opts},
            {o.min_capacity for o in opts})


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


def keep_by_score(expert_index: np.ndarray, order: np.ndarray, score: np.ndarray,
                  num_experts: int, capacity: int) -> np.ndarray:
    """Step 9, drop policy "probs" (Megatron-Core): each expert keeps its C best-scoring pairs.

    Args:
        expert_index: `<int>[T, K]`.
        order: `<int64>[N]` the candidate pairs (flat ids t*K + j) in priority order.
        score: `[T, K]` what the pairs compete on (the gate at selection; for expert choice the
            token's score for that expert).
        num_experts: E; capacity: C.
    Returns:
        keep `<bool>[T, K]`: True for the at most C pairs of each expert with the highest score,
        ties to the pair earlier in `order`; False for every pair outside `order`. The kept pairs
        then claim slots 0..n_e-1 in priority order (position_in_pair_order over the kept
        subsequence), so slots are filled by the same rule under every drop policy.
    Selection passes no gradient: which pairs survive is piecewise constant in the scores.
    """
    T, K = expert_index.shape
    flat_expert = expert_index.reshape(T * K)[order]  # [N]
    flat_score = score.reshape(T * K)[order]  # [N]
    rank = np.arange(order.size)  # [N] place in priority order, the tie-break
    # Sort by expert, then score descending, then priority: each expert's run starts with its best.
    by = np.lexsort((rank, -flat_score, flat_expert))  # [N]
    run_start = np.searchsorted(flat_expert[by], np.arange(num_experts))  # [E]
    place = np.arange(order.size) - run_start[flat_expert[by]]  # [N] rank inside the expert
    keep = np.zeros(T * K, dtype=bool)
    keep[order[by[place < capacity]]] = True
    return keep.reshape(T, K)


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
