"""Gemma 4's normalised inputs (layer keywords router_input_norm, expert_input_norm): the
router and the experts each read their own RMSNorm of the tokens x.

    router input  r = x / rms(x) * router_norm_scale * D^-1/2     (Gemma4TextRouter)
    expert input  u = x / rms(x) * expert_norm_weight             (pre_feedforward_layernorm_2)

with rms(x) = sqrt(mean_d x_d^2 + eps). Both are computed in float32 or wider (as Gemma's
RMSNorm does in float32) and returned in the caller's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class NormCache:
    normed: np.ndarray  # [T, D] x / rms(x), float32 or wider
    inv_rms: np.ndarray  # [T, 1] 1 / rms(x)
    scale: np.ndarray  # [D] what multiplies the normed x (weight times any constant)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float,
             const: float = 1.0) -> tuple[np.ndarray, NormCache]:
    """y `[T, D]` = x / sqrt(mean(x^2) + eps) * weight * const, for x `[T, D]`, weight `[D]`;
    computed in float32 or wider, returned in x's dtype, with the cache backward reads."""
    wide = np.promote_types(x.dtype, np.float32)
    xw = x.astype(wide, copy=False)  # [T, D]
    inv = 1.0 / np.sqrt((xw * xw).mean(axis=-1, keepdims=True) + eps)  # [T, 1]
    n = xw * inv  # [T, D]
    scale = weight.astype(wide) * const  # [D]
    return (n * scale).astype(x.dtype, copy=False), NormCache(n, inv, scale)


def rms_norm_backward(dy: np.ndarray, cache: NormCache,
                      const: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(dx `[T, D]`, d weight `[D]`) of rms_norm for dy `[T, D]`: with n = x / rms(x),
    d weight = const * sum_t dy * n, dn = dy * scale, dx = (dn - n mean_d(dn * n)) / rms(x)."""
    c = cache
    dyw = dy.astype(c.normed.dtype, copy=False)  # [T, D]
    dweight = (dyw * c.normed).sum(axis=0) * const  # [D]
    dn = dyw * c.scale  # [T, D]
    dx = c.inv_rms * (dn - c.normed * (dn * c.normed).mean(axis=-1, keepdims=True))  # [T, D]
    return dx.astype(dy.dtype, copy=False), dweight.astype(dy.dtype, copy=False)
