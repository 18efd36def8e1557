"""Step 12: the auxiliary losses that keep the router healthy, with their gradients."""
from __future__ import annotations

import numpy as np

from .capacity import expert_load
from .router import logsumexp


def load_balancing_loss(probs: np.ndarray, expert_index: np.ndarray) -> float:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4-6), top-K form.

    Args:
        probs: `[T, E]` router probabilities; expert_index: `<int>[T, K]`.
    Returns:
        aux_loss = E * sum_e f_e * P_e, where f_e = (number of the T*K assignments that chose e,
        before dropping) / (T*K) and P_e = mean_t probs[t, e]. It is 1.0 when routing is perfectly
        balanced (f_e = P_e = 1/E) and at most E. f is piecewise constant, so the gradient flows
        through P only. This normalisation (all K choices counted, divided by T*K) is Megatron-Core's
        and MegaBlocks'; Mesh-TF, DeepSpeed top-2 and Tutel count first choices only (also balanced
        at 1), flaxformer counts "any of K" and HF Mixtral/Qwen count all K without dividing by K
        (both balanced at K), HF also pooling every layer (research/routing-conventions.md, row 35).
        0.0 when T = 0.
    """
    T, E = probs.shape
    K = expert_index.shape[1]
    if T == 0:
        return 0.0
    f = expert_load(expert_index, E) / (T * K)  # [E]
    P = probs.mean(axis=0)  # [E]
    return float(E * np.dot(f, P))


def load_balancing_loss_backward(probs: np.ndarray, expert_index: np.ndarray,
                                 coef: float = 1.0) -> np.ndarray:
    """d (coef * aux_loss) / d probs `[T, E]`: coef * E * f_e / T in every row."""
    T, E = probs.shape
    K = expert_index.shape[1]
    if T == 0:
        return np.zeros_like(probs)
    f = expert_load(expert_index, E) / (T * K)  # [E]
    return np.broadcast_to((coef * E / T) * f, (T, E)).astype(probs.dtype)  # [T, E]


def router_z_loss(router_logits: np.ndarray) -> float:
    """Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): mean_t logsumexp(router_logits[t])^2.

    It penalises large logits, which keeps the router's softmax out of float32 trouble. 0.0 when T = 0.
    """
    if router_logits.shape[0] == 0:
        return 0.0
    return float(np.mean(logsumexp(router_logits) ** 2))


def router_z_loss_backward(router_logits: np.ndarray, probs: np.ndarray,
                           coef: float = 1.0) -> np.ndarray:
    """d (coef * z_loss) / d router_logits `[T, E]` = coef * 2 * lse_t * probs[t, e] / T."""
    T = router_logits.shape[0]
    if T == 0:
        return np.zeros_like(router_logits)
    lse = logsumexp(router_logits)  # [T]
    return (coef * 2.0 / T) * lse[:, None] * probs  # [T, E]
