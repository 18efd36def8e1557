"""Step 2 variants: sigmoid scores, selection-only expert bias and its update rule.

softmax and its backward live in router.py; everything here produces `[T, E]` scores that the
top-K step ranks (selection) and the gate step reads (gates), which need not be the same array.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .. import _checks

# a pymoe.Routing (not imported: pymoe.routing imports this module)
RoutingResult = Any

SCORES = ("softmax", "sigmoid", "sqrtsoftplus")
# the elementwise scores: each expert scored on its own (no competition for a unit budget)
ELEMENTWISE = ("sigmoid", "sqrtsoftplus")


def sigmoid(router_logits: np.ndarray) -> np.ndarray:
    """Step 2, score="sigmoid" (DeepSeek-V3, Megatron-Core `score_function="sigmoid"`).

    Args:
        router_logits: `[T, E]`.
    Returns:
        scores `[T, E]` = 1 / (1 + exp(-logits)), each in (0, 1) independently: unlike softmax
        the experts do not compete for a unit budget. Computed without overflow for any sign.
    """
    z = np.exp(-np.abs(router_logits))  # [T, E] in (0, 1]
    return np.where(router_logits >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


def log_sigmoid(router_logits: np.ndarray) -> np.ndarray:
    """log sigmoid(logits) `[..., n]` = min(l, 0) - log1p(exp(-|l|)): finite for every finite l,
    where sigmoid itself underflows to 0 below about -104 (float32) or -745 (float64)."""
    return np.minimum(router_logits, 0) - np.log1p(np.exp(-np.abs(router_logits)))


def stable_ratios(ratios: np.ndarray, scores: np.ndarray, log_scores: np.ndarray) -> np.ndarray:
    """ratios `[T, n]` = scores / scores.sum(-1), with the rows whose sum is below the dtype's
    smallest normal number (every score underflowed: 0 / 0) taken from the scores' logarithms
    `[T, n]` instead (the logits for softmax probabilities, log_sigmoid for sigmoid scores):
    exp(ls_i - max ls) / sum_j exp(ls_j - max ls), the same ratio computed without underflow.
    Rows with a normal sum keep their bits."""
    bad = underflowed_rows(scores)  # [T]
    if not bad.any():
        return ratios
    ls = log_scores[bad]  # [T_bad, n]
    z = np.exp(ls - ls.max(axis=-1, keepdims=True))
    out = np.array(ratios, copy=True)
    out[bad] = (z / z.sum(axis=-1, keepdims=True)).astype(out.dtype)
    return out


def underflowed_rows(scores: np.ndarray, squared: bool = False) -> np.ndarray:
    """`<bool>[T]`: rows of `[T, n]` scores whose sum is not a normal number (squared: whose
    square is not, as the backward of a ratio divides by it)."""
    tiny = np.finfo(scores.dtype).tiny
    return ~(scores.sum(axis=-1) >= (np.sqrt(tiny) if squared else tiny))


def sqrt_softplus(router_logits: np.ndarray) -> np.ndarray:
    """Step 2, score="sqrtsoftplus" (DeepSeek-V4's default `scoring_func`, HF ACT2FN
    "sqrtsoftplus").

    Args:
        router_logits: `[T, E]`.
    Returns:
        scores `[T, E]` = sqrt(log(1 + exp(logits))), each > 0 on its own like sigmoid, but
        unbounded above (about sqrt(l) for large l) and about exp(l / 2) for very negative l.
    """
    sp = np.maximum(router_logits, 0) + np.log1p(np.exp(-np.abs(router_logits)))  # [T, E]
    return np.sqrt(sp)


def log_sqrt_softplus(router_logits: np.ndarray) -> np.ndarray:
    """log sqrt_softplus(logits) `[..., n]` = log(softplus(l)) / 2, finite for every finite l
    (softplus(l) = exp(l) (1 - exp(l) / 2 + ...) below -40, so its log is l to double precision)."""
    low = router_logits < -40
    safe = np.where(low, 0.0, router_logits)
    sp = np.maximum(safe, 0) + np.log1p(np.exp(-np.abs(safe)))
    return 0.5 * np.where(low, router_logits, np.log(sp))


def elementwise_scores(router_logits: np.ndarray, score: str) -> np.ndarray:
    """Step 2 for an elementwise score (ELEMENTWISE): `[T, E]` sigmoid or sqrt_softplus."""
    return sigmoid(router_logits) if score == "sigmoid" else sqrt_softplus(router_logits)


def log_scores(router_logits: np.ndarray, score: str) -> np.ndarray:
    """log of the scores `[..., n]` up to a per-token constant: the logits themselves for
    softmax, log_sigmoid or log_sqrt_softplus for the elementwise scores."""
    if score == "softmax":
        return router_logits
    return log_sigmoid(router_logits) if score == "sigmoid" else log_sqrt_softplus(router_logits)


def dlog_score(router_logits: np.ndarray, scores: np.ndarray, score: str) -> np.ndarray:
    """d log s / d l `[..., n]` of an elementwise score, written without dividing by s (so it
    holds where s underflowed): 1 - s for sigmoid; sigmoid(l) / (2 softplus(l)) for
    sqrt_softplus, taken from the logarithms (1/2 in the limit l -> -inf)."""
    if score == "sigmoid":
        return 1 - scores
    return 0.5 * np.exp(log_sigmoid(router_logits) - 2 * log_sqrt_softplus(router_logits))


def elementwise_scores_backward(dscores: np.ndarray, router_logits: np.ndarray,
                                scores: np.ndarray, score: str) -> np.ndarray:
    """Backward of elementwise_scores: d router_logits `[T, E]`; sigmoid: dscores s (1 - s);
    sqrt_softplus: s = sqrt(sp), ds/dl = sigmoid(l) / (2 s)."""
    if score == "sigmoid":
        return sigmoid_backward(dscores, scores)
    with np.errstate(divide="ignore", invalid="ignore"):  # s = 0 only below l ~ -1490 (f64)
        d = dscores * sigmoid(router_logits) / (2 * scores)
    return np.where(scores > 0, d, dscores * 0.5 * np.exp(log_sigmoid(router_logits)
                                                           - log_sqrt_softplus(router_logits)))


def sigmoid_backward(dscores: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Backward of sigmoid: d router_logits `[T, E]` = dscores * s * (1 - s)."""
    return dscores * scores * (1.0 - scores)


def selection_scores(scores: np.ndarray, expert_bias: np.ndarray | None) -> np.ndarray:
    """What the top-K step ranks: the scores plus a per-expert bias (aux-loss-free balancing).

    Args:
        scores: `[T, E]`; expert_bias: `[E]` or None.
    Returns:
        `[T, E]` = scores + expert_bias (Wang et al. 2024, arXiv:2408.15664). The bias only
        changes which experts are chosen, never a gate value (gates read the unbiased scores), so
        it gets no gradient: it is trained by update_expert_bias instead.
    """
    return scores if expert_bias is None else scores + expert_bias


def routing_selection_scores(routing: RoutingResult) -> np.ndarray:
    """selection_scores of a Routing: `[T, E]`, its scores plus the bias it was routed with."""
    return selection_scores(routing.probs, routing.expert_bias)


def update_expert_bias(expert_bias: np.ndarray, expert_load: np.ndarray,
                       rate: float) -> np.ndarray:
    """The aux-loss-free balancing update the training loop calls after each step.

    Args:
        expert_bias: `[E]` the current bias.
        expert_load: `[E]` assignments per expert in the step (Routing.expert_load, before
            dropping; summed over data-parallel ranks in a distributed run).
        rate: the update speed u >= 0 (1e-3 in DeepSeek-V3 and Megatron-Core).
    Returns:
        a new `[E]` bias = bias + u * sign(mean_load - load_e): under-loaded experts become more
        attractive, over-loaded ones less; an expert exactly at the mean is left alone. The
        argument is not modified.
    """
    bias = _checks.float_array("expert_bias", expert_bias, ndim=1, shape=(None,))
    load = np.asarray(expert_load)
    if load.dtype.kind not in "iuf" or load.shape != bias.shape:
        raise ValueError(f"expert_load: expected a numeric array of shape {bias.shape}, got "
                         f"{load.dtype} {load.shape}")
    if load.dtype.kind == "f" and not np.isfinite(load).all():
        raise ValueError(f"expert_load: expected finite values, got "
                         f"{load.size - np.count_nonzero(np.isfinite(load))} NaN/inf entries")
    rate = _checks.nonnegative_finite("rate", rate)
    offset = load.mean() - load if load.size else load  # [E]
    return (bias + rate * np.sign(offset)).astype(bias.dtype)


def softmax_over_top_k(router_logits: np.ndarray, expert_index: np.ndarray) -> np.ndarray:
    """Gates as Mixtral and Megatron-Core (`moe_router_pre_softmax=False`) compute them.

    Args:
        router_logits: `[T, E]`; expert_index: `<int>[T, K]`.
    Returns:
        gate `[T, K]` = softmax over the K chosen logits. This equals topk.gates(softmax(logits),
        expert_index, True), the gates renormalised over the K chosen: p_j / sum_i p_i =
        exp(l_j) / sum_i exp(l_i) because the full softmax's denominator cancels
        (tests/variants/test_variants.py checks it).
    """
    chosen = np.take_along_axis(router_logits, expert_index, axis=-1)  # [T, K]
    z = np.exp(chosen - chosen.max(axis=-1, keepdims=True))  # [T, K]
    return z / z.sum(axis=-1, keepdims=True)
