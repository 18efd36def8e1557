"""ReLU routing (ReMoE: Wang et al., ICLR 2025, "ReMoE: Fully Differentiable Mixture-of-Experts
with ReLU Routing"; code github:thu-ml/ReMoE, megatron/core/transformer/moe/router.py ReLURouter
and megatron/training/training.py for the coefficient).

The gates are relu(logits) and a token's experts are those with a positive gate, so K varies per
token (0..E). route(..., selection="relu") lists all E experts per token, best first, and marks
the positive ones in Routing.selected (the others take no slot and count in no load). The k
keyword is the target K: it sets the target sparsity 1 - k/E, the capacity formula's K and the
regulariser's T*k. Sparsity is kept near the target by an L1 regulariser on the gates, written
as the Switch loss on relu scores and weighted by a coefficient that a training loop adapts after
every step (update_l1_coef): times 1.2 while the layer is denser than the target, divided by 1.2
otherwise, from 1e-8 (the original's moe_relu_l1_reg_coeff_init and _multiplier).
"""
from __future__ import annotations

import numpy as np

from .. import _checks
from ..capacity import expert_load
from ..losses import expert_prob_sum

L1_COEF_INIT = 1e-8  # lambda_0 of the paper (moe_relu_l1_reg_coeff_init)
L1_COEF_MULTIPLIER = 1.2  # alpha of the paper (moe_relu_l1_reg_coeff_multiplier)


def relu_scores(logits: np.ndarray) -> np.ndarray:
    """The gates of every expert, relu(logits) `[T, E]` (+0.0 where logits <= 0)."""
    return np.maximum(logits, 0) + 0.0


def relu_keep(logits: np.ndarray, expert_index: np.ndarray) -> np.ndarray:
    """selected `<bool>[T, K]`: the listed experts whose logit is positive (ReLURouter's
    routing_map = relu(logits) > 0)."""
    return np.take_along_axis(logits, expert_index, axis=-1) > 0


def l1_balance_loss(scores: np.ndarray, expert_index: np.ndarray, selected: np.ndarray,
                    k: int) -> float:
    """ReMoE's L1 regulariser with load balancing (before its coefficient):
    E * sum_e (n_e / (T*k)) * (sum_t relu_te / T), n_e the tokens routed to e (a constant) and
    k the target K: Megatron's switch_load_balancing_loss_func on the relu gates.

    Args: scores `[T, E]` relu gates, expert_index `<int>[T, K]`, selected `<bool>[T, K]`.
    0.0 when T = 0."""
    T, E = scores.shape
    if T == 0:
        return 0.0
    n = expert_load(expert_index[selected], E)  # [E]
    return float(E * np.dot(n / (T * k), expert_prob_sum(scores) / T))


def l1_balance_loss_backward(scores: np.ndarray, expert_index: np.ndarray,
                             selected: np.ndarray, k: int, coef: float = 1.0) -> np.ndarray:
    """d (coef * l1_balance_loss) / d scores `[T, E]`: coef * E * n_e / (T*k) / T in every row;
    the relu's own derivative is route_backward's."""
    T, E = scores.shape
    if T == 0:
        return np.zeros_like(scores)
    n = expert_load(expert_index[selected], E)  # [E]
    return np.broadcast_to((coef * E / T) * n / (T * k), (T, E)).astype(scores.dtype)


def relu_sparsity(selected: np.ndarray, num_experts: int) -> float:
    """1 - (routed pairs) / (T * E): the share of (token, expert) gates that are 0 (ReLURouter's
    recorded sparsity). selected `<bool>[T, K]`; 0.0 when T = 0."""
    T = selected.shape[0]
    return 1.0 - float(np.count_nonzero(selected)) / (T * num_experts) if T else 0.0


def update_l1_coef(coef: float, sparsity: float, k: int, num_experts: int,
                   multiplier: float = L1_COEF_MULTIPLIER) -> float:
    """The adaptive coefficient's step (training.py, after each training step): with target
    sparsity 1 - k/E, multiply by `multiplier` when sparsity < target (too many experts active),
    else divide by it. sparsity: the step's average over layers and micro-batches
    (relu_sparsity of each routing)."""
    coef = float(_checks.positive_finite("coef", coef) or 0)
    sparsity = float(_checks.nonnegative_finite("sparsity", sparsity))
    if sparsity > 1.0:
        raise ValueError(f"sparsity: expected a share in [0, 1], got {sparsity}")
    E = _checks.integer("num_experts", num_experts, low=1)
    k = _checks.integer("k", k, low=1, high=E)
    multiplier = float(_checks.positive_finite("multiplier", multiplier) or 0)
    target = 1 - k / E
    return coef * multiplier if sparsity < target else coef / multiplier
