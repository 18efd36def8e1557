"""Step 3 variant: Sinkhorn-balanced selection (BASE layers' balanced assignment, Megatron-Core's
sinkhorn router).

The top-K is taken over a doubly normalised version of exp(logits) whose columns carry equal
mass, so crowded experts are discounted. The balanced matrix only chooses; the gates come from
the plain scores, so no gradient flows through the iterations.
"""
from __future__ import annotations

import numpy as np

SINKHORN_ITERATIONS = 20
_EPS = 1e-8  # keeps a column that underflowed everywhere from dividing by zero (as Megatron-Core)


def sinkhorn(router_logits: np.ndarray, iterations: int = SINKHORN_ITERATIONS) -> np.ndarray:
    """Alternately rescale the rows and columns of exp(logits) (a fixed number of rounds).

    Args:
        router_logits: `[T, E]`.
        iterations: rounds of row-then-column scaling (Megatron-Core iterates to a tolerance of
            1e-4 instead; a fixed count keeps the result a pure function of the logits).
    Returns:
        balanced `[T, E]` = d0[t] * exp(logits[t, e]) * d1[e] with d0 making every row sum to 1/T
        and d1 every column to 1/E (exactly after the final column step, approximately for rows).
        Each row is first shifted by its maximum, which d0 absorbs, so exp() cannot overflow.
    """
    T, E = router_logits.shape
    if T == 0:
        return np.zeros_like(router_logits)
    cost = np.exp(router_logits - router_logits.max(axis=-1, keepdims=True))  # [T, E] in (0, 1]
    d1 = np.ones(E, dtype=cost.dtype)  # [E]
    d0 = np.ones(T, dtype=cost.dtype)  # [T]
    for _ in range(iterations):
        d0 = (1.0 / T) / (cost @ d1 + _EPS)  # [T] rows to 1/T
        d1 = (1.0 / E) / (d0 @ cost + _EPS)  # [E] columns to 1/E
    return d0[:, None] * cost * d1[None, :]
