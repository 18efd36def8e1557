"""Top-p (dynamic-K) routing: each token takes experts, best first, until their probability mass
passes p (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models",
arXiv 2403.07652; its code github:ZhenweiAn/Dynamic_MoE, `top_p_sampling_batched_all_sequence`).

K varies per token. route() keeps its `[T, K]` arrays (K = the keyword k, the most experts a
token may take: k = E is the paper's rule, which has no cap) and marks the pairs a token did not
take in `selected`; those pairs compete for no slot, get gate 0 and count in no load, so the
capacity and slot steps see a ragged selection (the candidates of slots.assign).
"""
from __future__ import annotations

import numpy as np

from ..capacity import expert_load
from ..losses import expert_prob_sum


def top_p_keep(probs: np.ndarray, expert_index: np.ndarray, p: float) -> np.ndarray:
    """Which of each token's ranked experts it takes.

    Args:
        probs: `[T, E]` softmax probabilities; expert_index: `<int>[T, K]`, best first.
        p: the threshold, 0 < p <= 1.
    Returns:
        selected `<bool>[T, K]`: choice j is taken iff the mass of choices 0..j-1 is <= p, i.e.
        every choice up to and including the first whose running sum passes p (strictly: > p).
        The first choice is always taken. This is the original's rule: cumsum of the sorted
        probabilities, mask = cumsum > p, and the first masked position is kept.
    """
    chosen_probs = np.take_along_axis(probs, expert_index, axis=-1)  # [T, K]
    crossed = np.cumsum(chosen_probs, axis=-1) > p  # [T, K], monotone along K
    selected = np.ones_like(crossed)  # [T, K]
    selected[:, 1:] = ~crossed[:, :-1]
    return selected


def experts_per_token(selected: np.ndarray) -> np.ndarray:
    """`<int64>[T]` the experts each token took, from selected `<bool>[T, K]`."""
    return np.count_nonzero(selected, axis=-1).astype(np.int64)


def ragged_balance_loss(probs: np.ndarray, expert_index: np.ndarray,
                        selected: np.ndarray) -> float:
    """The Switch load-balancing loss of a ragged selection.

    Args: probs `[T, E]`, expert_index `<int>[T, K]`, selected `<bool>[T, K]`.
    Returns:
        E * sum_e f_e * P_e, f_e = (selected pairs on e) / (all selected pairs N), P_e = mean_t
        probs[t, e]: with every pair selected, N = T*K and this is losses.load_balancing_loss;
        balanced routing gives 1 whatever the K per token. 0.0 when T = 0.
    """
    T, E = probs.shape
    if T == 0:
        return 0.0
    f = expert_load(expert_index[selected], E) / np.count_nonzero(selected)  # [E]
    return float(E * np.dot(f, expert_prob_sum(probs) / T))


def ragged_balance_loss_backward(probs: np.ndarray, expert_index: np.ndarray,
                                 selected: np.ndarray, coef: float = 1.0) -> np.ndarray:
    """d (coef * ragged_balance_loss) / d probs `[T, E]`: coef * E * f_e / T in every row (f is
    piecewise constant)."""
    T, E = probs.shape
    if T == 0:
        return np.zeros_like(probs)
    f = expert_load(expert_index[selected], E) / np.count_nonzero(selected)  # [E]
    return np.broadcast_to((coef * E / T) * f, (T, E)).astype(probs.dtype)  # [T, E]


def dynamic_loss(probs: np.ndarray) -> float:
    """The paper's dynamic loss L_d (its released code is inference only and lacks it): the
    router's entropy -sum_e P_e log P_e, averaged over the T tokens; minimising it sharpens the
    distribution so that top-p does not take every expert. probs `[T, E]` softmax
    probabilities; 0 log 0 = 0; 0.0 when T = 0."""
    if probs.shape[0] == 0:
        return 0.0
    plogp = probs * np.log(np.where(probs > 0, probs, 1.0))  # [T, E], 0 where p = 0
    return float(-plogp.sum(axis=-1).mean())


def dynamic_loss_backward(probs: np.ndarray, coef: float = 1.0) -> np.ndarray:
    """d (coef * dynamic_loss) / d logits `[T, E]` through the softmax: for H = -sum p log p,
    dH/dl_i = -p_i (log p_i + H) (log p_i written stably as l_i - lse; here from p, 0 where p = 0)."""
    T = probs.shape[0]
    if T == 0:
        return np.zeros_like(probs)
    logp = np.log(np.where(probs > 0, probs, 1.0))  # [T, E], 0 where p = 0
    H = -(probs * logp).sum(axis=-1, keepdims=True)  # [T, 1]
    return (-coef / T) * probs * (logp + H)  # [T, E]
