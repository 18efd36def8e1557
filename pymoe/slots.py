"""Steps 5-9 for every slot rule: which (token, choice) pairs get which expert slots.

route() runs the classic rule (choice-major, first C kept) as the recipe's own steps and every
other rule through `assign`, whichever backend does the work (NumPy, C, or CUDA on device arrays,
for CudaBackend.route). A slot rule is a priority (the order pairs claim slots in) plus a drop
policy (who survives when an expert is over capacity); both reduce to two primitives that every
backend provides with the same arguments and the same integers:
    assign_slots_ordered(expert_index, order, E, C) -> (position, slot_owner, expert_load)
        pairs claim slots in `order`; each expert keeps its first C (drop policy "position").
    keep_by_score(expert_index, order, score, E, C) -> keep
        each expert keeps its C best-scoring pairs (drop policy "probs", expert choice).
The classic choice-major rule is also the contract function assign_slots(expert_index,
token_order, E, C), which needs no explicit order.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .capacity import slot_owner
from .priority import pair_order, position_in_pair_order

# a pymoe.options.RouteOptions (not imported: pymoe.options imports this module)
Options = Any

DROP_POLICIES = ("position", "probs")


def assign_slots_ordered(expert_index: np.ndarray, order: np.ndarray, num_experts: int,
                         capacity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs claim slots in an explicit order; each expert keeps its first C.

    Args:
        expert_index: `<int64>[T, K]`.
        order: `<int64>[N]` distinct flat pair ids t*K + j; pairs not listed get no slot.
        num_experts: E; capacity: C.
    Returns:
        position `<int64>[T, K]` (-1 where dropped or not listed), slot_owner `<int64>[E, C]`,
        expert_load `<int64>[E]` = listed pairs per expert, before dropping.
    """
    position = position_in_pair_order(expert_index, num_experts, order)  # [T, K]
    position = np.where(position < capacity, position, -1)  # past capacity: dropped
    load = np.bincount(expert_index.reshape(-1)[order], minlength=num_experts).astype(np.int64)
    return position, slot_owner(expert_index, position, capacity, num_experts), load


def assign(backend, expert_index: np.ndarray, token_order: np.ndarray, num_experts: int,
           capacity: int, *, priority: str = "choice", drop_policy: str = "position",
           score: np.ndarray | None = None, candidates: np.ndarray | None = None,
           xp: Any = np) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The slot rule of route(): priority order, optional pre-filter, drop policy, slots.

    Args:
        backend: who computes (pymoe.backends: "numpy" or "c"; the CUDA backend's route() passes
            itself, with device arrays and xp its array module); the integers are the same.
        expert_index: `<int64>[T, K]`; token_order: `<int64>[T]` (priority.priority_order).
        priority: "token" walks pairs token-major, anything else choice-major (pair_order).
        drop_policy: "position" keeps each expert's first C pairs in priority order; "probs"
            keeps its C pairs with the highest `score` `[T, K]`, ties to the earlier pair in
            priority order, and then lets the kept pairs claim slots 0..n_e-1 in priority order.
            route() passes the gate at selection before the scaling factor (topk.gates; a
            positive factor does not change the ranking, and leaving it out keeps it exact).
        candidates: `<bool>[T, K]` or None; pairs that are False never compete (a second-expert
            policy's losers).
    Returns:
        position `<int64>[T, K]` (-1 where dropped), slot_owner `<int64>[E, C]`, expert_load
        `<int64>[E]`: competing pairs per expert before dropping.
    """
    if priority != "token" and drop_policy == "position" and candidates is None:
        return backend.assign_slots(expert_index, token_order, num_experts, capacity)
    order = pair_order(token_order, expert_index.shape[1], priority, xp)  # [T*K]
    if candidates is not None:
        order = order[candidates.reshape(-1)[order]]  # [N] competing pairs only
    if drop_policy == "probs":
        load = xp.bincount(expert_index.reshape(-1)[order], minlength=num_experts)
        keep = backend.keep_by_score(expert_index, order, score, num_experts, capacity)
        position, owner, _ = backend.assign_slots_ordered(expert_index, order[keep.reshape(-1)[order]],
                                                          num_experts, capacity)
        return position, owner, load.astype(np.int64)
    return backend.assign_slots_ordered(expert_index, order, num_experts, capacity)


def classic_rule(opts: Options, candidates: np.ndarray | None) -> bool:
    """Whether the options' slot rule is the classic one (choice-major, each expert's first C
    kept) with every pair competing: the rule assign hands to backend.assign_slots."""
    return opts.priority != "token" and opts.drop_policy == "position" and candidates is None


def assign_for(backend, expert_index: np.ndarray, token_order: np.ndarray, num_experts: int,
               capacity: int, opts: Options, *, score: np.ndarray | None = None,
               candidates: np.ndarray | None = None,
               xp: Any = np) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """assign with the options' priority and drop policy (pymoe.options.RouteOptions)."""
    return assign(backend, expert_index, token_order, num_experts, capacity,
                  priority=opts.priority, drop_policy=opts.drop_policy, score=score,
                  candidates=candidates, xp=xp)
