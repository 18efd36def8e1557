"""Step 11, indexed formulation: gather/scatter by (expert, slot), the form the C and CUDA paths mirror.

It computes what dense.py computes without any `[T, E, C]` tensor. Dispatch and combine are each
other's adjoints (Tutel's GatingEncoder/GatingDecoder, MegaBlocks' gather/scatter):
    dispatch backward = combine with unit weights,
    combine backward  = dispatch of gate * dy, plus dgate[t, j] = <dy[t], expert_out[e_tj, slot_tj]>.
Each function here has a C twin in csrc/ and a CUDA twin in csrc/cuda/ with the same arguments.
"""
from __future__ import annotations

import numpy as np


def dispatch_indexed(x: np.ndarray, slot_owner: np.ndarray, k: int,
                     weight: np.ndarray | None = None) -> np.ndarray:
    """Gather token rows into expert slots.

    Args:
        x: `[T, D]` token rows.
        slot_owner: `<int64>[E, C]`, t*K + j for the pair in slot (e, c), -1 when empty.
        k: K.
        weight: optional `[T, K]`; slot (e, c) then gets weight[t, j] * x[t] (used by combine's
            backward with weight = gate and x = dy).
    Returns:
        expert_in `[E, C, D]`; empty slots are 0.
    """
    E, C = slot_owner.shape
    D = x.shape[1]
    flat = slot_owner.reshape(E * C)  # [E*C]
    filled = flat >= 0  # [E*C]
    src = flat[filled]  # [n] flat (t, j) of each filled slot
    rows = x[src // k]  # [n, D]
    if weight is not None:
        rows *= weight.reshape(-1)[src].astype(x.dtype)[:, None]
    expert_in = np.zeros((E * C, D), dtype=x.dtype)  # [E*C, D]
    expert_in[filled] = rows
    return expert_in.reshape(E, C, D)


def kept_rows(expert_out: np.ndarray, expert_index: np.ndarray, position: np.ndarray,
              j: int) -> tuple[np.ndarray, np.ndarray]:
    """Choice j's kept pairs and the expert rows they read.

    Returns:
        kept `<bool>[T]` (position[:, j] >= 0) and rows `[n, D]` = expert_out[e_tj, position_tj]
        for the n kept tokens, in token order (a fresh array).
    """
    E, C, D = expert_out.shape
    kept = position[:, j] >= 0  # [T]
    rows = expert_out.reshape(E * C, D)[expert_index[kept, j] * C + position[kept, j]]  # [n, D]
    return kept, rows


def combine_indexed(expert_out: np.ndarray, expert_index: np.ndarray, position: np.ndarray,
                    weight: np.ndarray | None = None) -> np.ndarray:
    """Weighted sum of each token's expert outputs.

    Args:
        expert_out: `[E, C, D]`; only filled slots are read.
        expert_index, position: `<int64>[T, K]`, position -1 where dropped.
        weight: `[T, K]` gates, or None for unit weights (dispatch's backward).
    Returns:
        y `[T, D]`: y[t] = sum over kept j, in order j = 0..K-1, of weight[t, j] *
        expert_out[e_tj, position_tj]; a token with every choice dropped gets 0.
    """
    T, K = position.shape
    y = np.zeros((T, expert_out.shape[2]), dtype=expert_out.dtype)  # [T, D]
    for j in range(K):
        kept, rows = kept_rows(expert_out, expert_index, position, j)  # [T], [n, D]
        if weight is not None:
            rows *= weight[kept, j].astype(expert_out.dtype)[:, None]
        y[kept] += rows
    return y


def gate_grad_indexed(dy: np.ndarray, expert_out: np.ndarray, expert_index: np.ndarray,
                      position: np.ndarray) -> np.ndarray:
    """Gradient of combine with respect to its weights.

    Returns:
        dgate `[T, K]` = <dy[t], expert_out[e_tj, position_tj]> for kept pairs, 0 for dropped ones.
    """
    T, K = position.shape
    dgate = np.zeros((T, K), dtype=expert_out.dtype)  # [T, K]
    for j in range(K):
        kept, rows = kept_rows(expert_out, expert_index, position, j)  # [T], [n, D]
        dgate[kept, j] = np.einsum("nd,nd->n", dy[kept], rows)
    return dgate
