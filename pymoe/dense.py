"""Step 10-11, dense formulation: `[T, E, C]` tensors and einsums (the form the tutorial shows).

dispatch_mask and combine_weights are the GShard / flaxformer MaskedRouter tensors. They make
dispatch and combine one einsum each, at the price of O(T*E*C) memory; the indexed formulation
(indexed.py) computes the same thing with gathers and is what the fast paths mirror.
"""
from __future__ import annotations

import numpy as np

from . import memory


def one_hot(index: np.ndarray, n: int) -> np.ndarray:
    """`<bool>[..., n]` one-hot of `index`; an index of -1 (dropped) gives an all-False row."""
    return index[..., None] == np.arange(n)


def dense_tensors(expert_index: np.ndarray, position: np.ndarray, gate: np.ndarray,
                  num_experts: int, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Step 10: the dispatch mask and combine weights.

    Args:
        expert_index: `<int>[T, K]`; position: `<int>[T, K]` (-1 where dropped); gate: `[T, K]`
        (0 where dropped).
    Returns:
        dispatch_mask `<bool>[T, E, C]`: True iff token t sits in slot c of expert e;
        combine_weights `[T, E, C]`: the gate of that assignment there, 0 elsewhere.
    The mask is built from the kept positions, never from combine_weights != 0 (Mesh-TF and
    DeepSpeed do the latter), so a kept token whose gate underflows to 0 still reaches its expert.
    """
    T, K = expert_index.shape
    E, C, size = num_experts, capacity, np.dtype(gate.dtype).itemsize
    memory.check("dispatch_mask", T * E * C * (1 + size) + T * K * (E + C) * (1 + size),
                 f"the dense [T, E, C] = [{T}, {E}, {C}] dispatch mask and combine weights",
                 "the indexed formulation computes the same in O(T*K*D): "
                 "MoELayer(formulation='indexed'), or Routing.slot_owner / position with "
                 "pymoe.indexed")
    e1h = one_hot(expert_index, num_experts)  # <bool>[T, K, E]
    c1h = one_hot(position, capacity)  # <bool>[T, K, C], all False for dropped pairs
    # A bool einsum is an OR of ANDs: the mask itself, with no wider [T, E, C] intermediate.
    dispatch_mask = np.einsum("tke,tkc->tec", e1h, c1h)  # <bool>[T, E, C]
    combine_weights = np.einsum("tk,tke,tkc->tec", gate, e1h.astype(gate.dtype),
                                c1h.astype(gate.dtype))  # [T, E, C], one pass, no intermediate
    return dispatch_mask, combine_weights


def dispatch_dense(x: np.ndarray, dispatch_mask: np.ndarray) -> np.ndarray:
    """Step 11a: move tokens into expert slots. x `[T, D]` -> expert_in `[E, C, D]` (empty slots 0)."""
    return np.einsum("tec,td->ecd", dispatch_mask.astype(x.dtype), x, optimize=True)


def dispatch_dense_backward(d_expert_in: np.ndarray, dispatch_mask: np.ndarray) -> np.ndarray:
    """Backward of dispatch_dense: dx `[T, D]` = sum_{e,c} mask[t, e, c] * d_expert_in[e, c]."""
    return np.einsum("tec,ecd->td", dispatch_mask.astype(d_expert_in.dtype), d_expert_in,
                     optimize=True)


def combine_dense(expert_out: np.ndarray, combine_weights: np.ndarray) -> np.ndarray:
    """Step 11c: y `[T, D]` = sum_{e,c} combine_weights[t, e, c] * expert_out[e, c]."""
    return np.einsum("tec,ecd->td", combine_weights.astype(expert_out.dtype), expert_out,
                     optimize=True)


def combine_dense_backward(dy: np.ndarray, expert_out: np.ndarray,
                           combine_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Backward of combine_dense.

    Returns:
        d_expert_out `[E, C, D]` = sum_t combine_weights[t, e, c] * dy[t], and
        d_combine_weights `[T, E, C]` = <dy[t], expert_out[e, c]>.
    """
    d_out = np.einsum("tec,td->ecd", combine_weights.astype(dy.dtype), dy, optimize=True)
    d_cw = np.einsum("td,ecd->tec", dy, expert_out, optimize=True)
    return d_out, d_cw


def gate_grad_from_dense(d_combine_weights: np.ndarray, expert_index: np.ndarray,
                         position: np.ndarray) -> np.ndarray:
    """dgate `[T, K]`: d_combine_weights read at each kept (expert, slot); 0 for dropped pairs.

    Only kept entries matter: a dropped pair's gate is the constant 0, so no gradient flows to it.
    """
    T, K = position.shape
    kept = position >= 0  # [T, K]
    t = np.broadcast_to(np.arange(T)[:, None], (T, K))  # [T, K]
    dgate = np.zeros((T, K), dtype=d_combine_weights.dtype)
    dgate[kept] = d_combine_weights[t[kept], expert_index[kept], position[kept]]
    return dgate
