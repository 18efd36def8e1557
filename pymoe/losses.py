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
        (both balanced at K), HF also pooling every layer (docs/conventions.md, section 8).
        0.0 when T = 0.
    """
    T, E = probs.shape
    K = expert_index.shape[1]
    return load_balancing_loss_from_sums(expert_load(expert_index, E), expert_prob_sum(probs), T, K)


def expert_prob_sum(probs: np.ndarray) -> np.ndarray:
    """`[E]` sum over tokens of probs `[T, E]`, added in token order (the order the C core uses).

    probs.sum(axis=0) adds row after row for E >= 2; a single column NumPy sums pairwise, so
    that case goes through cumsum, which adds in order.
    """
    if probs.shape[1] == 1 and probs.shape[0]:
        return np.cumsum(probs, axis=0)[-1]  # [1]
    return probs.sum(axis=0)  # [E]


def load_balancing_loss_from_sums(expert_load: np.ndarray, prob_sum: np.ndarray, num_tokens: int,
                                  k: int) -> float:
    """load_balancing_loss from its sufficient statistics, as a backend's top_k returns them.

    Args:
        expert_load: `<int64>[E]` assignments per expert; prob_sum: `[E]` = expert_prob_sum(probs).
    Returns:
        E * sum_e (expert_load[e] / (T*K)) * (prob_sum[e] / T): the same bits as
        load_balancing_loss when prob_sum has them (probs.mean(axis=0) is prob_sum / T).
    """
    T, E = num_tokens, expert_load.shape[0]
    if T == 0:
        return 0.0
    f = expert_load / (T * k)  # [E]
    P = prob_sum / T  # [E]
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


LOAD_BALANCING = ("switch", "k_scaled", "sequence", "first_choice")


def aux_loss_scores(scores: np.ndarray, score: str) -> np.ndarray:
    """The `[T, E]` probabilities the load-balancing loss reads: softmax probabilities as they
    are; sigmoid scores divided by their sum over experts (DeepSeek-V3, Megatron-Core), so that
    each row is a distribution either way."""
    if score == "softmax":
        return scores
    return scores / scores.sum(axis=-1, keepdims=True)


def aux_loss_scores_backward(dprobs: np.ndarray, scores: np.ndarray, score: str) -> np.ndarray:
    """Backward of aux_loss_scores: d scores `[T, E]`; for sigmoid, q = s / S gives
    ds_i = (dq_i - sum_e dq_e q_e) / S."""
    if score == "softmax":
        return dprobs
    s = scores.sum(axis=-1, keepdims=True)  # [T, 1]
    q = scores / s
    return (dprobs - (dprobs * q).sum(axis=-1, keepdims=True)) / s


def balance_loss(probs: np.ndarray, expert_index: np.ndarray, kind: str = "switch",
                 sequence_length: int | None = None) -> float:
    """The load-balancing loss as each system scales it.

    Args:
        probs: `[T, E]` (aux_loss_scores); expert_index: `<int>[T, K]`.
        kind: "switch": load_balancing_loss (Switch, Megatron-Core, MegaBlocks; balanced at 1).
            "k_scaled": K times that (HF Mixtral / Qwen-MoE count all K choices without dividing
            by K; balanced at K). "sequence": load_balancing_loss of each block of
            sequence_length consecutive tokens, averaged over the blocks (DeepSeek-V3's
            sequence-wise loss, Megatron-Core `seq_aux_loss`; T must be a multiple).
            "first_choice": load_balancing_loss counting each token's first choice only (Mesh-TF,
            DeepSpeed top-1/top-2, Tutel `gshard_loss`; balanced at 1).
    """
    K = expert_index.shape[1]
    if kind == "first_choice":
        return load_balancing_loss(probs, expert_index[:, :1])
    if kind == "k_scaled":
        return K * load_balancing_loss(probs, expert_index)
    if kind == "sequence":
        if sequence_length is None:
            raise ValueError("sequence_length: required for the per-sequence balance loss")
        S = sequence_length
        n = probs.shape[0] // S
        return float(np.mean([load_balancing_loss(probs[i * S:(i + 1) * S],
                                                  expert_index[i * S:(i + 1) * S])
                              for i in range(n)])) if n else 0.0
    return load_balancing_loss(probs, expert_index)


def balance_loss_backward(probs: np.ndarray, expert_index: np.ndarray, coef: float,
                          kind: str = "switch", sequence_length: int | None = None) -> np.ndarray:
    """d (coef * balance_loss) / d probs `[T, E]`."""
    K = expert_index.shape[1]
    if kind == "first_choice":
        return load_balancing_loss_backward(probs, expert_index[:, :1], coef)
    if kind == "k_scaled":
        return load_balancing_loss_backward(probs, expert_index, coef * K)
    if kind == "sequence":
        if sequence_length is None:
            raise ValueError("sequence_length: required for the per-sequence balance loss")
        S = sequence_length
        n = probs.shape[0] // S
        d = np.zeros_like(probs)
        for i in range(n):
            rows = slice(i * S, (i + 1) * S)
            d[rows] = load_balancing_loss_backward(probs[rows], expert_index[rows], coef / n)
        return d
    return load_balancing_loss_backward(probs, expert_index, coef)


def router_z_loss(router_logits: np.ndarray) -> float:
    """Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): mean_t logsumexp(router_logits[t])^2.

    It penalises large logits, which keeps the router's softmax out of float32 trouble. 0.0 when T = 0.
    """
    return router_z_loss_from_lse(logsumexp(router_logits))


def router_z_loss_from_lse(lse: np.ndarray) -> float:
    """router_z_loss from logsumexp(router_logits) `[T]` (route() gets it from the softmax pass)."""
    return float(np.mean(lse ** 2)) if lse.shape[0] else 0.0


def router_z_loss_backward(router_logits: np.ndarray, probs: np.ndarray,
                           coef: float = 1.0) -> np.ndarray:
    """d (coef * z_loss) / d router_logits `[T, E]` = coef * 2 * lse_t * probs[t, e] / T."""
    T = router_logits.shape[0]
    if T == 0:
        return np.zeros_like(router_logits)
    lse = logsumexp(router_logits)  # [T]
    return (coef * 2.0 / T) * lse[:, None] * probs  # [T, E]
