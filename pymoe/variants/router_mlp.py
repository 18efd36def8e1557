"""Zaya's MLP router with a cross-layer router state (step 1 replaced).

    h      = x @ w_router_down + b_router_down   (+ state * router_state_scale)     [T, R]
    n      = rms(h) * router_norm_weight        (an RMSNorm, float32 or wider)     [T, R]
    a1     = gelu(n @ w_router_fc1 + b_router_fc1)                                  [T, R]
    a2     = gelu(a1 @ w_router_fc2 + b_router_fc2)                                 [T, R]
    logits = a2 @ w_router + b_router                                               [T, E]

gelu is the exact one, z * Phi(z) = z (1 + erf(z / sqrt 2)) / 2 (torch's nn.GELU()). h is the
router state this layer hands to the next: the next layer's router adds it, times its own
learned router_state_scale `[R]`, to its own h (Zaya's "EDA"); the first layer reads none.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .latent import rms, rms_backward

_ERF = np.frompyfunc(math.erf, 1, 1)
ROUTER_MLP_PARAMS = ("w_router_down", "b_router_down", "router_norm_weight", "w_router_fc1",
                     "b_router_fc1", "w_router_fc2", "b_router_fc2")


def _erf(z: np.ndarray) -> np.ndarray:
    """erf elementwise (math.erf per entry: NumPy has none; the router's arrays are [T, R])."""
    return np.asarray(_ERF(z), dtype=z.dtype)


def gelu_erf(z: np.ndarray) -> np.ndarray:
    """z * Phi(z), the exact GELU, elementwise."""
    return z * 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))


def gelu_erf_backward(dy: np.ndarray, z: np.ndarray) -> np.ndarray:
    """dy * (Phi(z) + z phi(z)) for y = gelu_erf(z)."""
    cdf = 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return dy * (cdf + z * pdf)


@dataclass
class RouterMLPCache:
    x: np.ndarray  # [T, D] the router's input
    state: np.ndarray | None  # [T, R] the previous layer's router state, or None
    h: np.ndarray  # [T, R] this layer's router state
    hw: np.ndarray  # [T, R] h in float32 or wider, for the norm
    inv: np.ndarray  # [T, 1]
    n: np.ndarray  # [T, R] rms(h) (before the weight)
    z1: np.ndarray  # [T, R]
    a1: np.ndarray  # [T, R]
    z2: np.ndarray  # [T, R]
    a2: np.ndarray  # [T, R]


def router_mlp_forward(x: np.ndarray, p: dict[str, np.ndarray], state: np.ndarray | None,
                       eps: float) -> tuple[np.ndarray, np.ndarray, RouterMLPCache]:
    """(logits `[T, E]`, the router state for the next layer `[T, R]`, cache) for tokens x
    `[T, D]` and the previous layer's state `[T, R]` (None: none, as Zaya's first layer)."""
    dt = x.dtype
    h = x @ p["w_router_down"].astype(dt) + p["b_router_down"].astype(dt)  # [T, R]
    if state is not None:
        h = h + state.astype(dt) * p["router_state_scale"].astype(dt)
    hw = h.astype(np.promote_types(dt, np.float32))
    n, inv = rms(hw, eps)
    n = n.astype(dt)
    z1 = (n * p["router_norm_weight"].astype(dt)) @ p["w_router_fc1"].astype(dt) \
        + p["b_router_fc1"].astype(dt)
    a1 = gelu_erf(z1)
    z2 = a1 @ p["w_router_fc2"].astype(dt) + p["b_router_fc2"].astype(dt)
    a2 = gelu_erf(z2)
    logits = a2 @ p["w_router"].astype(dt) + p["b_router"].astype(dt)  # [T, E]
    return logits, h, RouterMLPCache(x, state, h, hw, inv, n, z1, a1, z2, a2)


def router_mlp_backward(dlogits: np.ndarray, c: RouterMLPCache, p: dict[str, np.ndarray],
                        d_state_next: np.ndarray | None
                        ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
    """(dx `[T, D]`, the router's gradients, d previous state `[T, R]` or None) for d logits and
    the next layer's gradient of this layer's state (None: no next layer reads it)."""
    dt = c.x.dtype
    g: dict[str, np.ndarray] = {"w_router": c.a2.T @ dlogits, "b_router": dlogits.sum(axis=0)}
    da2 = dlogits @ p["w_router"].astype(dt).T
    dz2 = gelu_erf_backward(da2, c.z2)
    g["w_router_fc2"], g["b_router_fc2"] = c.a1.T @ dz2, dz2.sum(axis=0)
    dz1 = gelu_erf_backward(dz2 @ p["w_router_fc2"].astype(dt).T, c.z1)
    nw = c.n * p["router_norm_weight"].astype(dt)
    g["w_router_fc1"], g["b_router_fc1"] = nw.T @ dz1, dz1.sum(axis=0)
    dnw = dz1 @ p["w_router_fc1"].astype(dt).T  # [T, R]
    g["router_norm_weight"] = (dnw * c.n).sum(axis=0)
    dh = rms_backward((dnw * p["router_norm_weight"].astype(dt)).astype(c.hw.dtype), c.hw,
                      c.inv).astype(dt)
    if d_state_next is not None:
        dh = dh + d_state_next.astype(dt)
    d_state = None
    if c.state is not None:
        g["router_state_scale"] = (dh * c.state).sum(axis=0)
        d_state = dh * p["router_state_scale"].astype(dt)
    g["w_router_down"], g["b_router_down"] = c.x.T @ dh, dh.sum(axis=0)
    return dh @ p["w_router_down"].astype(dt).T, g, d_state
