"""Steps 3-4 of routing: each token's top-K experts and their gate values."""
from __future__ import annotations

import numpy as np


def top_k(router_logits: np.ndarray, k: int) -> np.ndarray:
    """Step 3: each token's K best experts, best first.

    Args:
        router_logits: `[T, E]`.
        k: K, 1 <= K <= E.
    Returns:
        expert_index `<int64>[T, K]`; row t holds K distinct experts in decreasing logit order.

    Convention (tie-breaking): experts are ranked by their *logit*; equal logits go to the lower
    expert index. Ranking logits rather than probabilities gives the same order (softmax is
    strictly increasing) but stays exact where two different logits round to the same probability,
    so the C and CUDA paths can reproduce it bit for bit. A stable sort of -logits implements it.
    """
    return np.argsort(-router_logits, axis=-1, kind="stable")[:, :k].astype(np.int64)  # [T, K]


def gates(probs: np.ndarray, expert_index: np.ndarray, normalize: bool) -> np.ndarray:
    """Step 4: the weight each chosen expert's output gets.

    Args:
        probs: `[T, E]` router probabilities.
        expert_index: `[T, K]` from top_k.
        normalize: False keeps the raw probabilities (Switch, flaxformer: the K gates of a token sum
            to at most 1); True divides by their sum over the K chosen (GShard, Mixtral: they sum
            to 1), which equals a softmax over the K selected logits.
    Returns:
        gate `[T, K]`, before any capacity drop.

    Convention: renormalising happens here, at selection, and never again after a drop: a token
    whose second choice overflows keeps g1 < 1 (as Mesh-TF, Tutel and Megatron-Core do; DeepSpeed
    renormalises the survivors instead; research/routing-conventions.md, row 4). With K = 1 the
    renormalised gate is always exactly 1, so the router gets no gradient from the task loss.
    """
    g = np.take_along_axis(probs, expert_index, axis=-1)  # [T, K]
    if normalize:
        g = g / g.sum(axis=-1, keepdims=True)  # [T, K], rows sum to 1
    return g


def gates_backward(dgate: np.ndarray, probs: np.ndarray, expert_index: np.ndarray,
                   normalize: bool) -> np.ndarray:
    """Backward of step 4: d probs `[T, E]` (zero outside each token's chosen experts).

    With normalize, g_j = p_j / S and S = sum_i p_i, so dp_i = dg_i / S - sum_j dg_j p_j / S^2.
    """
    p = np.take_along_axis(probs, expert_index, axis=-1)  # [T, K]
    if normalize:
        s = p.sum(axis=-1, keepdims=True)  # [T, 1]
        dp_sel = dgate / s - (dgate * p).sum(axis=-1, keepdims=True) / (s * s)  # [T, K]
    else:
        dp_sel = dgate  # [T, K]
    dprobs = np.zeros_like(probs)  # [T, E]
    np.put_along_axis(dprobs, expert_index, dp_sel, axis=-1)  # experts in a row are distinct
    return dprobs
