"""Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts", Algorithm 1).

No routing and no dropping: each of the E*S slots is a softmax-over-tokens mix of every token
(dispatch weights), each expert processes its S slots, and each token's output is a softmax-over-
slots mix of every slot's output (combine weights). Fully differentiable; every token gets an
output. Legend: B sequences (groups mixed on their own), N tokens per sequence, D model dim,
E experts, S slots per expert, H expert hidden width.

    logits  L[b, n, (e s)] = norm(x[b, n]) . norm(phi[e, s])     phi: slot_embeds [E, S, D]
    dispatch  Dw = softmax over n of L;  combine  Cw = softmax over (e s) of L
    slots[b, (e s)] = sum_n Dw[b, n, (e s)] norm(x[b, n]);  out = expert_e(slots[b, e, :])
    y[b, n] = sum_(e s) Cw[b, n, (e s)] out[b, (e s)]

As in soft-moe-pytorch (lucidrains), the slots mix the normalised tokens. The expert forms are
pymoe.expert_forms' (activation=...), run by pymoe.experts on `[E, B*S, D]` blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _checks
from .expert_forms import FormSpec, form_spec, hidden_width
from .experts import ExpertsCache, experts_backward, experts_forward
from .options import SoftMoEOptions, keywords_doc, soft_moe_options
from .router import softmax, softmax_backward

L2_EPS = 1e-12  # torch.nn.functional.normalize's floor on the norm


def rms_normalize(v: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """u = v / max(||v||, 1e-12) * sqrt(D) * weight for v `[..., D]`, weight `[D]`; returns (u,
    the norms `[..., 1]` floored)."""
    r = np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), L2_EPS)  # [..., 1]
    return v / r * (np.sqrt(v.shape[-1]) * weight), r


def rms_normalize_backward(du: np.ndarray, v: np.ndarray, weight: np.ndarray,
                           r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dv `[..., D]`, dweight `[D]`) of rms_normalize; where the norm was floored, v / eps is
    linear in v."""
    scale = np.sqrt(v.shape[-1])
    z = v / r  # [..., D]
    dweight = (du * z * scale).reshape(-1, v.shape[-1]).sum(axis=0)  # [D]
    dz = du * weight * scale  # [..., D]
    radial = np.where(r > L2_EPS, (dz * z).sum(axis=-1, keepdims=True), 0.0)  # [..., 1]
    return (dz - z * radial) / r, dweight


def soft_weights(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dispatch, combine) `[B, N, E*S]` from logits `[B, N, E*S]`: dispatch sums to 1 over the
    N tokens of each slot, combine to 1 over the E*S slots of each token."""
    dispatch = softmax(logits.transpose(0, 2, 1)).transpose(0, 2, 1)  # [B, N, ES]
    return dispatch, softmax(logits)


def soft_weights_backward(d_dispatch: np.ndarray, d_combine: np.ndarray, dispatch: np.ndarray,
                          combine: np.ndarray) -> np.ndarray:
    """d logits `[B, N, E*S]` of soft_weights: each softmax's backward along its own axis."""
    dd = softmax_backward(d_dispatch.transpose(0, 2, 1), dispatch.transpose(0, 2, 1))
    return dd.transpose(0, 2, 1) + softmax_backward(d_combine, combine)


@dataclass
class _Cache:
    x_shape: tuple[int, ...]
    x3: np.ndarray  # [B, N, D]
    xn: np.ndarray  # [B, N, D] normalised tokens
    x_norm: np.ndarray | None  # [B, N, 1]
    phi: np.ndarray  # [ES, D] normalised slot embeddings
    phi_norm: np.ndarray | None  # [ES, 1]
    dispatch: np.ndarray  # [B, N, ES]
    combine: np.ndarray  # [B, N, ES]
    experts: ExpertsCache
    out: np.ndarray  # [B, ES, D] expert outputs per slot


class SoftMoELayer:
    """A Soft MoE feed-forward layer: y = combine @ experts(dispatch^T @ norm(x)) per sequence.

    Args:
        d_model: D; d_hidden: H; num_experts: E; num_slots: S (slots per expert).
        dtype: float32 or float64 for the parameters and the math.
        seed: initialises the parameters (slot embeddings standard normal, as soft-moe-pytorch;
            experts fan-in scaled normal; biases zero; norm weights ones).
        keywords: normalize (pymoe.options.SoftMoEOptions) and the expert-form keywords of
            pymoe.options.ExpertOptions (activation, swiglu_limit, swiglu_alpha, swiglu_softcap).

    Attributes:
        params, grads: slot_embeds `[E, S, D]`, w1 `[E, D, W]`, b1 `[E, W]`, w2 `[E, H, D]`,
            b2 `[E, D]` (W = 2H for a gated form), and with normalize norm_weight `[D]`,
            slot_norm_weight `[D]`. backward() overwrites grads.
        dispatch_weights, combine_weights: `[B, N, E*S]` of the last forward (viz.soft_moe_picture
            draws them).
    """

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, num_slots: int = 1, *,
                 dtype: np.dtype | type = np.float32, seed: int = 0, **keywords: Any) -> None:
        self.d_model = _checks.integer("d_model", d_model, low=1)
        self.d_hidden = _checks.integer("d_hidden", d_hidden, low=1)
        self.num_experts = _checks.integer("num_experts", num_experts, low=1)
        self.options, self.expert_options = soft_moe_options(num_slots=num_slots, **keywords)
        try:
            self.dtype = np.dtype(dtype)
        except TypeError as err:
            raise TypeError(f"dtype: expected float32 or float64, got {dtype!r}") from err
        if dtype is None or self.dtype.type not in (np.float32, np.float64):
            raise TypeError(f"dtype: expected float32 or float64, got {dtype!r}")
        rng = np.random.default_rng(_checks.integer("seed", seed, low=0))
        D, H, E, S = self.d_model, self.d_hidden, self.num_experts, self.num_slots
        W = hidden_width(self.expert_options.activation, H)
        params = {
            "slot_embeds": rng.normal(0.0, 1.0, (E, S, D)),
            "w1": rng.normal(0.0, np.sqrt(1.0 / D), (E, D, W)), "b1": np.zeros((E, W)),
            "w2": rng.normal(0.0, np.sqrt(1.0 / H), (E, H, D)), "b2": np.zeros((E, D)),
        }
        if self.normalize:
            params.update(norm_weight=np.ones(D), slot_norm_weight=np.ones(D))
        self.params: dict[str, np.ndarray] = {n: p.astype(self.dtype) for n, p in params.items()}
        self.grads: dict[str, np.ndarray] = {n: np.zeros_like(p) for n, p in self.params.items()}
        self._cache: _Cache | None = None
        self.dispatch_weights: np.ndarray | None = None
        self.combine_weights: np.ndarray | None = None

    @property
    def num_slots(self) -> int:
        return self.options.num_slots

    @property
    def normalize(self) -> bool:
        return self.options.normalize

    @property
    def expert_form(self) -> FormSpec:
        o = self.expert_options
        return form_spec(o.activation, swiglu_limit=o.swiglu_limit, swiglu_alpha=o.swiglu_alpha,
                         swiglu_softcap=o.swiglu_softcap)

    def _params(self) -> dict[str, np.ndarray]:
        for name, p in self.params.items():
            if p.shape != self.grads[name].shape or not np.isfinite(p).all():
                raise ValueError(f"params['{name}']: expected a finite array of shape "
                                 f"{self.grads[name].shape}, got shape {p.shape}")
        return self.params

    def forward(self, x: np.ndarray) -> np.ndarray:
        """y for x `[N, D]` (one sequence) or `[B, N, D]` (B sequences, each mixed on its own);
        N >= 1. Returns y with x's shape in the layer dtype."""
        x = _checks.float_array("x", x, min_ndim=2)
        if x.ndim > 3 or x.shape[-1] != self.d_model or x.shape[-2] == 0:
            raise ValueError(f"x: expected shape [N, {self.d_model}] or [B, N, {self.d_model}] "
                             f"with N >= 1, got {tuple(x.shape)}")
        p = self._params()
        x3 = np.ascontiguousarray(x.reshape((-1,) + x.shape[-2:]), dtype=self.dtype)  # [B, N, D]
        B, E, S, D = x3.shape[0], self.num_experts, self.num_slots, self.d_model
        phi_raw = p["slot_embeds"].reshape(E * S, D)  # [ES, D]
        x_norm = phi_norm = None
        if self.normalize:
            xn, x_norm = rms_normalize(x3, p["norm_weight"])  # [B, N, D]
            phi, phi_norm = rms_normalize(phi_raw, p["slot_norm_weight"])  # [ES, D]
        else:
            xn, phi = x3, phi_raw
        logits = xn @ phi.T  # [B, N, ES]
        dispatch, combine = soft_weights(logits)  # [B, N, ES] each
        slots = dispatch.transpose(0, 2, 1) @ xn  # [B, ES, D]
        expert_in = slots.reshape(B, E, S, D).transpose(1, 0, 2, 3).reshape(E, B * S, D)
        out, ecache = experts_forward(np.ascontiguousarray(expert_in), p["w1"], p["b1"], p["w2"],
                                      p["b2"], self.expert_form)  # [E, B*S, D]
        out = out.reshape(E, B, S, D).transpose(1, 0, 2, 3).reshape(B, E * S, D)  # [B, ES, D]
        y = combine @ out  # [B, N, D]
        if not np.isfinite(y).all():
            raise ValueError(f"x: the Soft MoE output overflowed in {self.dtype}; scale x down")
        self._cache = _Cache(x.shape, x3, xn, x_norm, phi, phi_norm, dispatch, combine, ecache,
                             out)
        self.dispatch_weights, self.combine_weights = dispatch, combine
        return y.reshape(x.shape)

    __call__ = forward

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """Differentiate sum(y * dy): returns dx with the last forward's x shape; fills grads
        (overwriting)."""
        c = self._cache
        if c is None:
            raise ValueError("backward: called before forward(); there is no forward pass to "
                             "differentiate")
        dy = _checks.float_array("dy", dy, shape=c.x_shape)
        p = self._params()
        B, N, D = c.x3.shape
        E, S = self.num_experts, self.num_slots
        dy3 = dy.reshape(B, N, D).astype(self.dtype)  # [B, N, D]
        d_combine = dy3 @ c.out.transpose(0, 2, 1)  # [B, N, ES]
        d_out = c.combine.transpose(0, 2, 1) @ dy3  # [B, ES, D]
        d_out_e = d_out.reshape(B, E, S, D).transpose(1, 0, 2, 3).reshape(E, B * S, D)
        d_in, grads = experts_backward(np.ascontiguousarray(d_out_e), p["w1"], p["w2"],
                                       c.experts)  # [E, B*S, D]
        d_slots = d_in.reshape(E, B, S, D).transpose(1, 0, 2, 3).reshape(B, E * S, D)
        d_dispatch = c.xn @ d_slots.transpose(0, 2, 1)  # [B, N, ES]
        dxn = c.dispatch @ d_slots  # [B, N, D] (slots mix the normalised tokens)
        dlogits = soft_weights_backward(d_dispatch, d_combine, c.dispatch, c.combine)
        dxn += dlogits @ c.phi  # [B, N, D]
        dphi = np.einsum("bnk,bnd->kd", dlogits, c.xn)  # [ES, D]
        if self.normalize:
            assert c.x_norm is not None and c.phi_norm is not None
            dx, grads["norm_weight"] = rms_normalize_backward(dxn, c.x3, p["norm_weight"],
                                                              c.x_norm)
            dphi, grads["slot_norm_weight"] = rms_normalize_backward(
                dphi, p["slot_embeds"].reshape(E * S, D), p["slot_norm_weight"], c.phi_norm)
        else:
            dx = dxn
        grads["slot_embeds"] = dphi.reshape(E, S, D)
        for name in self.params:
            if not np.isfinite(grads[name]).all():
                raise ValueError(f"dy: the gradient of params['{name}'] overflowed in "
                                 f"{self.dtype}; scale dy down")
        self.grads = {n: np.asarray(grads[n]).astype(self.dtype) for n in self.params}
        return dx.reshape(c.x_shape).astype(self.dtype)


SoftMoELayer.__doc__ = (SoftMoELayer.__doc__ or "") + (
    "\n    Keywords (pymoe.options.SoftMoEOptions):\n" + keywords_doc(SoftMoEOptions))
