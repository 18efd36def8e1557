"""Steps 1-2 of routing: router logits and the softmax over experts.

Legend (shared by every module, the C core and the CUDA kernels):
    T tokens, D model dim, E experts, K choices per token, C expert capacity, H expert hidden dim.
"""
from __future__ import annotations

import numpy as np


def router_dtype(dtype: np.dtype | type) -> np.dtype:
    """The dtype the router computes in: the input's, promoted to at least float32.

    Mesh-TF, flaxformer and DeepSpeed cast the router to float32 because low-precision logits flip
    top-k choices (docs/conventions.md, section 1); float64 stays float64.
    """
    return np.result_type(dtype, np.float32)


def jitter(x: np.ndarray, eps: float, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative router noise: x * U(1 - eps, 1 + eps), drawn per entry.

    Args:
        x: `[T, D]` the router's copy of the tokens (the experts never see the noise, as in
           flaxformer, DeepSpeed and Megatron; HF Mixtral also jitters the experts' input).
    Returns:
        noise `[T, D]`, the multipliers (kept for the backward pass).
    """
    return rng.uniform(1.0 - eps, 1.0 + eps, size=x.shape).astype(x.dtype, copy=False)


def router_logits(x: np.ndarray, w_router: np.ndarray, b_router: np.ndarray) -> np.ndarray:
    """Step 1: score every token against every expert.

    Args:
        x: `[T, D]` tokens (already in the router dtype, jittered or not).
        w_router: `[D, E]`, b_router: `[E]`.
    Returns:
        router_logits `[T, E]` = x @ w_router + b_router; row t ranks the experts for token t.
    """
    return x @ w_router + b_router  # [T, E]


def router_logits_backward(drouter_logits: np.ndarray, x: np.ndarray,
                           w_router: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of step 1. Returns (dx `[T, D]`, dw_router `[D, E]`, db_router `[E]`), fresh arrays."""
    dx = drouter_logits @ w_router.T  # [T, D]
    dw = x.T @ drouter_logits  # [D, E]
    db = drouter_logits.sum(axis=0)  # [E]
    return dx, dw, db


def softmax(router_logits: np.ndarray) -> np.ndarray:
    """Step 2: probabilities over experts, numerically stable.

    Args:
        router_logits: `[T, E]`.
    Returns:
        probs `[T, E]`; every row is positive and sums to 1. Subtracting the row maximum first
        keeps exp() from overflowing and does not change the result.
    """
    z = router_logits - router_logits.max(axis=-1, keepdims=True)  # [T, E], max entry 0
    e = np.exp(z)  # [T, E] in (0, 1]
    return e / e.sum(axis=-1, keepdims=True)  # [T, E]


def softmax_backward(dprobs: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Backward of step 2: d router_logits `[T, E]` = p * (dp - sum_e dp * p)."""
    return probs * (dprobs - (dprobs * probs).sum(axis=-1, keepdims=True))


def softmax_lse(router_logits: np.ndarray,
                out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """softmax(router_logits) `[T, E]` and logsumexp(router_logits) `[T]` from one exp pass.

    The same bits as the two functions (the same max, exponentials and row sums), computed in
    place (in `out` when given, `[T, E]`): route() needs both, and exp over [T, E] is the
    costliest step of routing in NumPy. Each row depends on its own logits only.
    """
    m = router_logits.max(axis=-1, keepdims=True)  # [T, 1]
    e = np.subtract(router_logits, m, out=out)  # [T, E], max entry 0
    np.exp(e, out=e)
    s = e.sum(axis=-1, keepdims=True)  # [T, 1]
    lse = m[:, 0] + np.log(s[:, 0])  # [T]
    e /= s
    return e, lse


def logsumexp(router_logits: np.ndarray) -> np.ndarray:
    """log sum_e exp(router_logits[t, e]) per token, `[T]`, computed stably (used by the z-loss)."""
    m = router_logits.max(axis=-1)  # [T]
    return m + np.log(np.exp(router_logits - m[:, None]).sum(axis=-1))  # [T]
