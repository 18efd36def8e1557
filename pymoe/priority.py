"""Steps 5-7 of routing: one-hot the choices, order them by priority, and count positions.

This is the classic recipe (Mesh-TF, GShard, flaxformer): a token's position inside its expert is
the number of earlier (token, choice) pairs that chose the same expert, where "earlier" means the
priority order below. Every compiled path (C, CUDA) reproduces exactly these integers.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import memory
from .dense import one_hot


def expert_mask(expert_index: np.ndarray, num_experts: int) -> np.ndarray:
    """Step 5: one-hot the chosen experts.

    Args:
        expert_index: `<int>[T, K]`.
        num_experts: E.
    Returns:
        `<bool>[T, K, E]` with mask[t, j, e] True iff token t's j-th choice is expert e; each
        [t, j] row holds exactly one True (one byte per entry: this is the largest array here).
    """
    return one_hot(expert_index, num_experts)  # [T, K, E]


def priority_order(probs: np.ndarray, priority: str,
                   rng: np.random.Generator | None = None, xp: Any = np) -> np.ndarray:
    """Step 6a: the order in which tokens claim expert slots.

    Args:
        probs: `[T, E]` router scores (softmax probabilities or sigmoid scores).
        priority: "choice" and "token" keep token order (0, 1, ..., T-1), as Switch/GShard and
            HF/MegaBlocks do; "score" is batch-prioritised routing (V-MoE, Riquelme et al. 2021,
            sec. 3.2): tokens sorted by their top-1 score (before any renormalisation), highest
            first, ties to the lower token index; "random" is DeepSpeed's random token selection
            (RTS): a uniformly random permutation drawn from `rng`.
        rng: required for "random" (same generator state, same permutation).
        xp: the array module of `probs` (CuPy for the CUDA backend's device route).
    Returns:
        token_order `<int64>[T]`, a permutation: token_order[i] is the i-th token to claim slots.
        Whether a token's later choices wait for everyone's first choice is pair_order's job.
    """
    T = probs.shape[0]
    if priority in ("choice", "token"):
        return xp.arange(T, dtype=np.int64)  # [T]
    if priority == "random":
        if rng is None:
            raise ValueError("seed: priority='random' needs a seed or a numpy Generator")
        return xp.asarray(rng.permutation(T).astype(np.int64))  # [T], drawn on the host
    top1 = probs.max(axis=-1) if probs.size else xp.zeros(T, probs.dtype)  # [T]
    # stable: ties keep token order (CuPy's argsort is a stable radix sort and takes no kind=)
    order = xp.argsort(-top1, kind="stable") if xp is np else xp.argsort(-top1)  # [T]
    return order.astype(np.int64)


def pair_order(token_order: np.ndarray, k: int, priority: str, xp: Any = np) -> np.ndarray:
    """Step 6b': every (token, choice) pair, as flat ids t*K + j, in the order they claim slots.

    Args:
        token_order: `<int64>[T]` from priority_order.
        k: K.
        priority: "token" is token-major (token_order[0]'s choices j = 0..K-1, then
            token_order[1]'s, ...: HF, NLLB, MegaBlocks), so a token's second choice can beat a
            later token's first; every other priority is choice-major (all j = 0 pairs in
            token order, then all j = 1 pairs, ...: Mesh-TF, GShard, flaxformer).
        xp: the array module of token_order (numpy, or cupy for device arrays).
    Returns:
        `<int64>[T*K]`, a permutation of 0..T*K-1.
    """
    j = xp.arange(k, dtype=np.int64)
    if priority == "token":
        return (token_order[:, None] * k + j[None, :]).reshape(-1)  # [T*K], token-major
    return (token_order[None, :] * k + j[:, None]).reshape(-1)  # [K*T], choice-major


def choice_major(mask: np.ndarray, token_order: np.ndarray) -> np.ndarray:
    """Step 6b: permute the one-hot mask so that every first choice outranks any second choice.

    Args:
        mask: `[T, K, E]` from expert_mask.
        token_order: `[T]` from priority_order.
    Returns:
        `[K*T, E]`; row j*T + i is choice j of token token_order[i]. Reading the rows top to bottom
        is the priority order: all first choices (in token order), then all second choices, ...
    """
    T, K, E = mask.shape
    return mask[token_order].transpose(1, 0, 2).reshape(K * T, E)  # [K*T, E]


def position_in_expert(expert_index: np.ndarray, num_experts: int,
                       token_order: np.ndarray) -> np.ndarray:
    """Step 7: each (token, choice)'s position inside its expert, before any capacity drop.

    Args:
        expert_index: `<int>[T, K]`.
        num_experts: E.
        token_order: `[T]` from priority_order.
    Returns:
        position `<int64>[T, K]`: the number of (token, choice) pairs ahead of (t, j) in priority
        order that chose the same expert. For each expert the positions are 0, 1, ..., load - 1.
    """
    T, K = expert_index.shape
    # The counts reach at most K*T: int32 holds them unless K*T >= 2**31 (half of int64's bytes).
    count_dtype = np.int32 if K * T < 2**31 else np.int64
    memory.check("expert_index", T * K * num_experts * (2 + np.dtype(count_dtype).itemsize),
                 f"the NumPy slot assignment's [T, K, E] = [{T}, {K}, {num_experts}] one-hot "
                 "and its running count",
                 "the C backend assigns the same slots in O(T*K) memory: MoELayer(backend='c') "
                 "or pymoe.get_backend('c').assign_slots")
    mask = expert_mask(expert_index, num_experts)  # <bool>[T, K, E]
    ordered = choice_major(mask, token_order)  # <bool>[K*T, E]
    del mask
    # Accumulated in place: cumsum(..., dtype=) would first cast into a temporary of that width.
    cum = ordered.astype(count_dtype)  # [K*T, E]
    del ordered
    np.cumsum(cum, axis=0, out=cum)  # [K*T, E]; at a 1, the count of 1s so far
    ordered_index = expert_index[token_order].T.reshape(K * T)  # [K*T] expert of each row
    pos = cum[np.arange(K * T), ordered_index].reshape(K, T).T - 1  # [T, K], in priority order
    position = np.empty((T, K), dtype=np.int64)  # [T, K], row-major like every other array
    position[token_order] = pos  # undo the token permutation
    return position


def position_in_pair_order(expert_index: np.ndarray, num_experts: int,
                           order: np.ndarray) -> np.ndarray:
    """Step 7 for any slot rule: positions counted along an explicit pair order.

    Args:
        expert_index: `<int>[T, K]`.
        num_experts: E.
        order: `<int64>[N]` distinct flat pair ids t*K + j (pair_order, possibly with pairs
            removed: a drop policy's or a second-expert policy's losers never claim a slot).
    Returns:
        position `<int64>[T, K]`: for a pair in `order`, the number of pairs before it in `order`
        that chose the same expert; -1 for pairs not in `order`. With the choice-major order of
        every pair this is exactly position_in_expert.
    """
    T, K = expert_index.shape
    N = order.size
    count_dtype = np.int32 if N < 2**31 else np.int64
    memory.check("expert_index", N * num_experts * (1 + np.dtype(count_dtype).itemsize),
                 f"the NumPy slot assignment's [N, E] = [{N}, {num_experts}] one-hot and its "
                 "running count",
                 "the C backend assigns the same slots in O(T*K) memory: MoELayer(backend='c')")
    flat_expert = expert_index.reshape(T * K)[order]  # [N] expert of each pair, in order
    cum = (flat_expert[:, None] == np.arange(num_experts)).astype(count_dtype)  # [N, E] one-hot
    np.cumsum(cum, axis=0, out=cum)  # [N, E]; at a 1: the count of 1s so far
    position = np.full(T * K, -1, dtype=np.int64)  # [T*K]
    position[order] = cum[np.arange(N), flat_expert] - 1
    return position.reshape(T, K)
