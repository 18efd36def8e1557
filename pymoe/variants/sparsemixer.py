"""Step 3-4 variant: SparseMixer (PhiMoE; Liu et al. 2024, arXiv:2409.12136), selection="sparsemixer".

K sequential picks (PhiMoE: K = 2). Pick j looks at the experts not picked yet; of those, the
candidates are the experts whose logit lies within a relative threshold of the best one,
(m - l_e) / max(|l_e|, m) <= 2 eps (m the largest remaining logit, eps HF's
router_jitter_noise); the gate is that pick's softmax over its candidates at the expert taken,
p_j[e_j]. At eval the pick is the best candidate (argmax). In training (sampling=True) it is a
Gumbel-max draw among the candidates, argmax(l_e - log X_e) with X_e ~ Exp(1), and the gate is
multiplied by the Heun third-order factor: 1 when the pick is the candidates' best or a uniform
draw exceeds 0.75, else 0.3333 (HF's constants; HEUN_THIRD). The backward is the same either way (HF's
PhimoeMultiplier): d l_e = sum_j dg_j p_j[e_j] (delta(e, e_j) - p_j[e]); the factor and the
draws pass no gradient, so in training it is the estimator, not the forward's derivative.

Random numbers, per pick in order: X `[T, E]` (rng.standard_exponential), then the uniform
`[T]` of the Heun factor (rng.random).
"""
from __future__ import annotations

import numpy as np

# HF: torch.add(0.3333, mask, alpha=0.6667), so 1 -> 1.0, 0 -> 0.3333, computed in float32 (a
# bool tensor plus a Python float takes torch's default dtype) and then cast to the model dtype:
# float32's 0.3333 = 0.33329999446868896 in a float64 model too
HEUN_THIRD = float(np.float32(0.3333))
HEUN_KEEP = 0.75  # a non-best pick keeps factor 1 when its uniform draw exceeds this


def candidates(router_logits: np.ndarray, taken: np.ndarray, eps: float) -> np.ndarray:
    """`<bool>[T, E]`: the experts pick j may take: not taken (`<bool>[T, E]`) and within the
    relative threshold (m - l_e) / max(|l_e|, m) <= 2 eps of the best remaining logit m (0 / 0,
    a zero logit at m = 0, counts as within, as in HF)."""
    rest = np.where(taken, -np.inf, router_logits)  # [T, E]
    m = rest.max(axis=-1, keepdims=True)  # [T, 1]
    factor = np.maximum(np.abs(router_logits), m)  # [T, E]
    with np.errstate(divide="ignore", invalid="ignore"):
        far = (m - router_logits) / factor > 2 * eps  # [T, E]; NaN compares False
    return ~taken & ~far


def masked_softmax(router_logits: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """`[T, E]` softmax of the logits over the experts where keep is True, 0 elsewhere."""
    z = np.where(keep, router_logits, -np.inf)  # [T, E]
    w = np.exp(z - z.max(axis=-1, keepdims=True))
    return w / w.sum(axis=-1, keepdims=True)


def pick_probs(router_logits: np.ndarray, expert_index: np.ndarray,
               eps: float) -> np.ndarray:
    """`[T, K, E]`: pick j's softmax p_j over its candidates, given the experts picked before
    it (expert_index `<int>[T, K]`, pick order); depends on the logits and the picks only."""
    T, E = router_logits.shape
    K = expert_index.shape[1]
    taken = np.zeros((T, E), dtype=bool)
    rows = np.arange(T)
    out = np.empty((T, K, E), dtype=router_logits.dtype)
    for j in range(K):
        out[:, j] = masked_softmax(router_logits, candidates(router_logits, taken, eps))
        taken[rows, expert_index[:, j]] = True
    return out


def sparsemixer(router_logits: np.ndarray, k: int, eps: float,
                rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Steps 3-4: (expert_index `<int64>[T, K]` in pick order, gate `[T, K]`) of router_logits
    `[T, E]`. rng None: eval (each pick the best candidate, gate p_j[e_j]); a Generator: training
    (Gumbel-max picks, gates times the Heun factor), drawing as the module docstring says."""
    T, E = router_logits.shape
    dt = router_logits.dtype
    taken = np.zeros((T, E), dtype=bool)
    rows = np.arange(T)
    index = np.empty((T, k), dtype=np.int64)
    gate = np.empty((T, k), dtype=dt)
    for j in range(k):
        keep = candidates(router_logits, taken, eps)  # [T, E]
        p = masked_softmax(router_logits, keep)  # [T, E]
        masked = np.where(keep, router_logits, -np.inf)  # [T, E]
        best = masked.argmax(axis=-1)  # [T]
        if rng is None:
            pick = best
        else:
            x = rng.standard_exponential((T, E)).astype(dt)  # [T, E]
            pick = (masked - np.log(x)).argmax(axis=-1)  # [T] Gumbel-max among candidates
        g = p[rows, pick]  # [T]
        if rng is not None:
            u = rng.random(T)  # [T]
            g = g * np.where((pick == best) | (u > HEUN_KEEP), 1.0, HEUN_THIRD).astype(dt)
        index[:, j], gate[:, j] = pick, g
        taken[rows, pick] = True
    return index, gate


def sparsemixer_gates(router_logits: np.ndarray, expert_index: np.ndarray,
                      eps: float) -> np.ndarray:
    """Eval gates `[T, K]` p_j[e_j] of a given selection (router replay, hash routing)."""
    p = pick_probs(router_logits, expert_index, eps)  # [T, K, E]
    return np.take_along_axis(p, expert_index[:, :, None], axis=-1)[:, :, 0]


def sparsemixer_backward(dgate: np.ndarray, router_logits: np.ndarray,
                         expert_index: np.ndarray, eps: float) -> np.ndarray:
    """d router_logits `[T, E]` = sum_j dg_j p_j[e_j] (onehot(e_j) - p_j): the derivative of the
    eval gates, and PhiMoE's estimator in training (dgate `[T, K]`)."""
    p = pick_probs(router_logits, expert_index, eps)  # [T, K, E]
    sel = np.take_along_axis(p, expert_index[:, :, None], axis=-1)[:, :, 0]  # [T, K]
    w = (dgate * sel).astype(p.dtype)  # [T, K]
    d = -(w[:, :, None] * p).sum(axis=1)  # [T, E]
    rows = np.arange(d.shape[0])
    for j in range(expert_index.shape[1]):
        d[rows, expert_index[:, j]] += w[:, j]  # picks of a token are distinct experts
    return d
