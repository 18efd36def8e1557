"""Latent MoE (MuseSpark, NemotronH): the experts run in a narrower space of width Dm.

    x_e = norm(x @ w_latent_in)           [T, Dm]  (latent_norm: a centred RMSNorm, else none)
    y   = (sum_j gate_j FFN_e(x_e)) @ w_latent_out   [T, D]

and the post-expert norm (MuseSpark, expert_post_norm): each expert's output o (before its gate
weighs it) becomes RMSNorm(o * (1 + w)), one weight w shared by all experts. Both RMSNorms keep
their weight as an offset from 1 (HF initialises it to 0) and compute in float32 or wider.

The RMSNorm of a row a: n = a / sqrt(mean(a^2) + eps); its backward, for dn:
da = inv * (dn - a * inv^2 * mean(dn * a)), inv = 1 / sqrt(mean(a^2) + eps).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _wide(dtype: np.dtype) -> np.dtype:
    return np.promote_types(dtype, np.float32)


def rms(a: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(a / sqrt(mean(a^2) + eps), inv `[..., 1]`) over the last axis of a `[..., W]`."""
    inv = 1.0 / np.sqrt((a * a).mean(axis=-1, keepdims=True) + eps)
    return a * inv, inv


def rms_backward(dn: np.ndarray, a: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """d a of n = rms(a) for dn (module docstring)."""
    return inv * (dn - a * (inv * inv) * (dn * a).mean(axis=-1, keepdims=True))


@dataclass
class NormCache:
    a: np.ndarray  # [..., W] what was normalised, float32 or wider
    inv: np.ndarray  # [..., 1]
    n: np.ndarray  # [..., W] rms(a)
    x: np.ndarray  # [..., W] the norm's input, float32 or wider


def centred_norm(x: np.ndarray, w: np.ndarray, eps: float) -> tuple[np.ndarray, NormCache]:
    """y = rms(x) * (1 + w), x `[..., W]`, w `[W]` (MuseSpark's pre-expert norm)."""
    xw = x.astype(_wide(x.dtype))
    n, inv = rms(xw, eps)
    return (n * (1.0 + w)).astype(x.dtype), NormCache(xw, inv, n, xw)


def centred_norm_backward(dy: np.ndarray, w: np.ndarray, c: NormCache
                          ) -> tuple[np.ndarray, np.ndarray]:
    """(dx, dw `[W]`) of centred_norm."""
    dyw = dy.astype(c.a.dtype)
    dw = (dyw * c.n).reshape(-1, c.n.shape[-1]).sum(axis=0)
    return rms_backward(dyw * (1.0 + w), c.a, c.inv).astype(dy.dtype), dw


def scaled_norm(x: np.ndarray, w: np.ndarray, eps: float) -> tuple[np.ndarray, NormCache]:
    """y = rms(x * (1 + w)), x `[..., W]`, w `[W]` (MuseSpark's post-expert norm: the weight
    first, then the norm). Rows of zeros stay zeros."""
    xw = x.astype(_wide(x.dtype))
    a = xw * (1.0 + w)
    n, inv = rms(a, eps)
    return n.astype(x.dtype), NormCache(a, inv, n, xw)


def scaled_norm_backward(dy: np.ndarray, w: np.ndarray, c: NormCache
                         ) -> tuple[np.ndarray, np.ndarray]:
    """(dx, dw `[W]`) of scaled_norm."""
    da = rms_backward(dy.astype(c.a.dtype), c.a, c.inv)
    dw = (da * c.x).reshape(-1, c.x.shape[-1]).sum(axis=0)
    return (da * (1.0 + w)).astype(dy.dtype), dw
