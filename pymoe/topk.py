"""Steps 3-4 of routing: each token's top-K experts and their gate values."""
from __future__ import annotations

from typing import Any

import numpy as np

from . import _checks

# a pymoe.options.RouteOptions (not imported: pymoe.options imports this module)
Options = Any

K1_NORMALIZE_WARNING = (
    "normalize=True with k=1: every gate is exactly 1.0, so the router gets no gradient from the "
    "task loss (only from the aux/z losses). Use normalize=False for Switch-style top-1 routing.")


def top_k(router_logits: np.ndarray, k: int) -> np.ndarray:
    """Step 3: each token's K best experts, best first.

    Args:
        router_logits: `[T, E]`.
        k: K, 1 <= K <= E.
    Returns:
        expert_index `<int64>[T, K]`; row t holds K distinct experts in decreasing logit order.

    Convention (tie-breaking): experts are ranked by their *logit*; equal logits go to the lower
    expert index. Ranking logits rather than probabilities gives the same order (softmax is
    strictly increasing) but stays exact where two different logits round to the same probability,
    so the C and CUDA paths can reproduce it bit for bit. A stable sort of -logits implements it.
    """
    return np.argsort(-router_logits, axis=-1, kind="stable")[:, :k].astype(np.int64)  # [T, K]


def chosen(probs: np.ndarray, expert_index: np.ndarray) -> np.ndarray:
    """probs[t, expert_index[t, j]] `[T, K]` for `[T, E]` probs and `<int>[T, K]` expert_index.

    np.take_along_axis(probs, expert_index, axis=-1), as one take from the flat array at
    t * E + e: the same values, without its broadcast index arrays (3x faster at E=256, K=8).
    """
    T, E = probs.shape
    return probs.reshape(-1).take(expert_index + np.arange(0, T * E, E)[:, None])  # [T, K]


def gates(probs: np.ndarray, expert_index: np.ndarray, normalize: bool) -> np.ndarray:
    """Step 4: the weight each chosen expert's output gets.

    Args:
        probs: `[T, E]` router probabilities.
        expert_index: `[T, K]` from top_k.
        normalize: False keeps the raw probabilities (Switch, flaxformer: the K gates of a token sum
            to at most 1); True divides by their sum over the K chosen (GShard, Mixtral: they sum
            to 1), which equals a softmax over the K selected logits.
    Returns:
        gate `[T, K]`, before any capacity drop.

    Convention: renormalising happens here, at selection, and never again after a drop: a token
    whose second choice overflows keeps g1 < 1 (as Mesh-TF, Tutel and Megatron-Core do; DeepSpeed
    renormalises the survivors instead; docs/conventions.md, section 3). With K = 1 the
    renormalised gate is always exactly 1, so the router gets no gradient from the task loss.
    """
    g = chosen(probs, expert_index)  # [T, K]
    if normalize:
        g = g / g.sum(axis=-1, keepdims=True)  # [T, K], rows sum to 1
    return g


def gates_backward(dgate: np.ndarray, probs: np.ndarray, expert_index: np.ndarray,
                   normalize: bool) -> np.ndarray:
    """Backward of step 4: d probs `[T, E]` (zero outside each token's chosen experts).

    With normalize, g_j = p_j / S and S = sum_i p_i, so dp_i = dg_i / S - sum_j dg_j p_j / S^2.
    """
    p = chosen(probs, expert_index)  # [T, K]
    if normalize:
        s = p.sum(axis=-1, keepdims=True)  # [T, 1]
        dp_sel = dgate / s - (dgate * p).sum(axis=-1, keepdims=True) / (s * s)  # [T, K]
    else:
        dp_sel = dgate  # [T, K]
    dprobs = np.zeros_like(probs)  # [T, E]
    np.put_along_axis(dprobs, expert_index, dp_sel, axis=-1)  # experts in a row are distinct
    return dprobs


def scale_gates(gate: np.ndarray, scaling_factor: float | None) -> np.ndarray:
    """Step 4b: the routed scaling factor (DeepSeek-V3 `routed_scaling_factor` = 2.5, Megatron-Core
    `moe_router_topk_scaling_factor`): gate `[T, K]` * factor, after any normalisation. Sigmoid
    gates renormalised over K sum to 1, which would shrink the routed branch against the shared
    experts; the factor restores its scale. None leaves the gates as they are. The backward is the
    same multiplication."""
    return gate if scaling_factor is None else gate * scaling_factor


def warn_k1_normalize(opts: Options) -> None:
    """K1_NORMALIZE_WARNING when the options renormalise a single top-1 gate (route(), MoELayer)."""
    if opts.normalize and opts.k == 1 and opts.selection != "experts":
        _checks.warn(K1_NORMALIZE_WARNING)


def plain_normalize(opts: Options) -> bool:
    """Whether the options renormalise by the plain sum (normalize_p 1, normalize_eps 0)."""
    return opts.normalize_p == 1.0 and opts.normalize_eps == 0.0


def lp_gates(probs: np.ndarray, expert_index: np.ndarray, p: float, eps: float) -> np.ndarray:
    """Step 4 with an L_p norm: g_j = s_j / (N + eps), N = (sum_i s_i^p)^(1/p) over the K chosen
    scores `[T, K]` of `[T, E]` probs (DBRX: p = moe_normalize_expert_weights, eps 0; lfm2_moe:
    p = 1, eps 1e-6). p = 1, eps = 0 is gates(..., normalize=True)."""
    s = chosen(probs, expert_index)  # [T, K]
    n = s.sum(axis=-1, keepdims=True) if p == 1.0 else \
        (s ** p).sum(axis=-1, keepdims=True) ** (1.0 / p)  # [T, 1]
    return s / (n + eps)


def lp_gates_backward(dgate: np.ndarray, probs: np.ndarray, expert_index: np.ndarray,
                      p: float, eps: float) -> np.ndarray:
    """Backward of lp_gates: d probs `[T, E]`. With M = N + eps and dN/ds_i = (s_i / N)^(p-1):
    ds_i = (dg_i - (sum_j dg_j s_j / M) (s_i / N)^(p-1)) / M."""
    s = chosen(probs, expert_index)  # [T, K]
    n = s.sum(axis=-1, keepdims=True) if p == 1.0 else \
        (s ** p).sum(axis=-1, keepdims=True) ** (1.0 / p)  # [T, 1]
    m = n + eps
    dot = (dgate * s).sum(axis=-1, keepdims=True) / m  # [T, 1]
    ratio = np.ones_like(s) if p == 1.0 else (s / n) ** (p - 1.0)  # [T, K]
    ds = (dgate - dot * ratio) / m  # [T, K]
    out = np.zeros_like(probs)  # [T, E]
    np.put_along_axis(out, expert_index, ds, axis=-1)
    return out


def gates_for(probs: np.ndarray, expert_index: np.ndarray, opts: Options) -> np.ndarray:
    """gates with the options' normalisation (pymoe.options.RouteOptions)."""
    if opts.normalize and not plain_normalize(opts):
        return lp_gates(probs, expert_index, opts.normalize_p, opts.normalize_eps)
    return gates(probs, expert_index, opts.normalize)


def gates_backward_for(dgate: np.ndarray, probs: np.ndarray, expert_index: np.ndarray,
                       opts: Options) -> np.ndarray:
    """gates_backward with the options' normalisation."""
    if opts.normalize and not plain_normalize(opts):
        return lp_gates_backward(dgate, probs, expert_index, opts.normalize_p, opts.normalize_eps)
    return gates_backward(dgate, probs, expert_index, opts.normalize)


def scale_for(gate: np.ndarray, opts: Options) -> np.ndarray:
    """scale_gates with the options' routed scaling factor (forward and backward alike)."""
    return scale_gates(gate, opts.scaling_factor)


def renormalize_kept(gate: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Step 9b, optional: renormalise the gates that survived the capacity drop.

    Args:
        gate: `[T, K]` gate values at selection; kept: `<bool>[T, K]`.
    Returns:
        `[T, K]`: kept gates divided by their sum over the token's kept choices (DeepSpeed
        top-2/top-K, NLLB), 0 for dropped pairs and for tokens with nothing kept. A token whose
        second choice overflowed then gets g1 = 1. This is the alternative to the default
        (topk.gates: renormalise at selection, never after a drop: Mesh-TF, Tutel, Megatron-Core).
    """
    g = np.where(kept, gate, 0).astype(gate.dtype)  # [T, K]
    s = g.sum(axis=-1, keepdims=True)  # [T, 1]
    return np.divide(g, s, out=np.zeros_like(g), where=s > 0)


def renormalize_kept_backward(dgate: np.ndarray, gate: np.ndarray,
                              kept: np.ndarray) -> np.ndarray:
    """Backward of renormalize_kept: d gate `[T, K]` (0 for dropped pairs).

    With g_j = a_j / S over kept j, da_i = dg_i / S - sum_j dg_j a_j / S^2.
    """
    a = np.where(kept, gate, 0).astype(gate.dtype)  # [T, K]
    s = a.sum(axis=-1, keepdims=True)  # [T, 1]
    safe = np.where(s > 0, s, 1)
    da = dgate / safe - (dgate * a).sum(axis=-1, keepdims=True) / (safe * safe)  # [T, K]
    return np.where(kept, da, 0).astype(gate.dtype)


SECOND_EXPERT_POLICIES = ("all", "none", "threshold", "random")


def second_expert_keep(probs: np.ndarray, expert_index: np.ndarray, policy: str,
                       threshold: float, rng: np.random.Generator | None) -> np.ndarray:
    """GShard / Mesh-TF second-expert policy (K = 2): whether each token's second choice is used.

    Args:
        probs: `[T, E]` router scores; expert_index: `<int>[T, 2]`.
        policy: "all" keeps every second choice; "none" drops them all; "threshold" keeps it iff
            g2 > threshold; "random" keeps it with probability min(1, g2 / threshold), drawing
            one U(0, 1) per token from rng (Mesh-TF's default, threshold 0.2). g2 is the second
            gate normalised over the two chosen, p2 / (p1 + p2), whatever `normalize` is.
    Returns:
        keep `<bool>[T, 2]`, column 0 all True. A removed second choice never claims a slot (it
        is taken out before slot assignment, as Mesh-TF does) and its gate is 0; the choice is
        piecewise constant, so it passes no gradient.
    """
    T, K = expert_index.shape
    keep = np.ones((T, K), dtype=bool)
    if policy == "all":
        return keep
    p = chosen(probs, expert_index)  # [T, 2]
    g2 = p[:, 1] / (p[:, 0] + p[:, 1])  # [T]
    if policy == "none":
        keep[:, 1] = False
    elif policy == "threshold":
        keep[:, 1] = g2 > threshold
    else:
        if rng is None:
            raise ValueError("rng: policy 'random' draws from a generator; pass one (or a seed "
                             "to route())")
        u = rng.uniform(size=T)  # [T]
        keep[:, 1] = u < g2 / threshold
    return keep
