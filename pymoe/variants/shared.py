"""Shared (always-on) experts: FFNs every token goes through, added to the routed output.

DeepSeek-V2/V3 add them plainly: y = routed(x) + sum_s FFN_s(x). Qwen1.5/2-MoE gate them per
token with a sigmoid of a learned projection: y = routed(x) + sigmoid(x . w_gate) * FFN(x);
Megatron-Core offers both. Inkling weighs each one by its own router score: y = routed(x) +
sum_s gamma_s FFN_s(x) (weights, from variants.joint_shared). They carry what every token
needs, so routed experts can specialise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..expert_forms import FormSpec
from ..experts import ExpertsCache, experts_backward, experts_forward
from .scores import sigmoid

if TYPE_CHECKING:
    from ..backend.protocol import Backend


@dataclass
class SharedCache:
    experts: ExpertsCache
    out: np.ndarray  # [T, D] sum of the shared experts' outputs, before the gate
    gate: np.ndarray | None  # [T] sigmoid gate, or None when ungated
    outs: np.ndarray | None = None  # [S, T, D] each shared expert's output, with weights
    weights: np.ndarray | None = None  # [T, S] each shared expert's weight per token, or None


def shared_experts_forward(x: np.ndarray, params: dict[str, np.ndarray],
                           activation: str | FormSpec, gated: bool,
                           weights: np.ndarray | None = None, backend: Backend | None = None
                           ) -> tuple[np.ndarray, SharedCache]:
    """y_shared `[T, D]` = g * sum_s FFN_s(x), g = sigmoid(x @ w_shared_gate) `[T]` or 1; with
    weights `[T, S]` (not gated): sum_s weights[:, s] * FFN_s(x).

    Args:
        x: `[T, D]`; params: shared_w1 `[S, D, Ws]`, shared_b1 `[S, Ws]`, shared_w2
            `[S, Hs, D]`, shared_b2 `[S, D]` (Ws = 2 Hs for a gated form, else Hs), and
            w_shared_gate `[D]` when gated.
        activation: the form (a name or an expert_forms.FormSpec), as experts_forward's.
        backend: None: the dense NumPy formulation (the reference). A backend (MoELayer passes
            the C one): experts_forward's filled-rows path with every row filled, on a stride-0
            view of x (no S copies of it) and with that backend's one-pass epilogues.
    """
    S, T = params["shared_w1"].shape[0], x.shape[0]
    expert_in = np.broadcast_to(x, (S,) + x.shape)  # [S, T, D]: every token to every shared FFN
    filled = None if backend is None else np.full(S, T)
    out, cache = experts_forward(expert_in if backend else np.ascontiguousarray(expert_in),
                                 params["shared_w1"], params["shared_b1"], params["shared_w2"],
                                 params["shared_b2"], activation, filled=filled,
                                 backend=backend)  # [S, T, D]
    if weights is not None:
        y = np.einsum("ts,std->td", weights, out)  # [T, D]
        return y, SharedCache(cache, y, None, out, weights)
    # one shared expert (DeepSeek's, Qwen's): its output itself; a sum over the length-1 axis is
    # one more pass into a fresh [T, D] array (and turns -0.0 into +0.0, nothing else)
    total = out[0] if S == 1 else out.sum(axis=0)  # [T, D]
    gate = sigmoid(x @ params["w_shared_gate"]) if gated else None  # [T]
    y = total if gate is None else gate[:, None] * total
    return y, SharedCache(cache, total, gate)


def shared_experts_backward(dy: np.ndarray, x: np.ndarray, params: dict[str, np.ndarray],
                            cache: SharedCache, backend: Backend | None = None
                            ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Backward of shared_experts_forward (backend: the one its forward had): (dx `[T, D]`,
    gradients of its parameters); with weights, also grads["shared_weights"] `[T, S]` =
    <dy, FFN_s(x)>."""
    grads = {}
    dx = np.zeros_like(x)
    d_total = dy
    if cache.gate is not None:
        g = cache.gate
        dgate_logit = (dy * cache.out).sum(axis=-1) * g * (1.0 - g)  # [T]
        grads["w_shared_gate"] = x.T @ dgate_logit  # [D]
        dx += dgate_logit[:, None] * params["w_shared_gate"][None, :]
        d_total = g[:, None] * dy
    S = params["shared_w1"].shape[0]
    if cache.weights is not None:
        assert cache.outs is not None
        grads["shared_weights"] = np.einsum("td,std->ts", dy, cache.outs)  # [T, S]
        d_out = np.ascontiguousarray(cache.weights.T[:, :, None] * dy[None])  # [S, T, D]
    else:
        d_out = np.broadcast_to(d_total, (S,) + d_total.shape)  # [S, T, D]
        if cache.experts.filled is None:  # the dense path's batched matmul takes a contiguous one
            d_out = np.ascontiguousarray(d_out)
    d_in, eg = experts_backward(d_out, params["shared_w1"], params["shared_w2"], cache.experts,
                                backend=backend)
    dx += d_in[0] if S == 1 else d_in.sum(axis=0)  # the same bits: 0 + d, as the sum starts
    grads.update({f"shared_{n}": g for n, g in eg.items()})
    return dx, grads
