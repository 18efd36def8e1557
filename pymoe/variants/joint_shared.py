"""Joint normalisation of the routed and the router-scored shared experts (Inkling, C6).

The router scores E routed and S shared experts, s = sigmoid(logits) `[T, E + S]`; each token
chooses K routed experts by s + b (the selection bias, routed ones only), and its K chosen and S
shared scores are normalised together and scaled:

    gate_j  = c * s_j / (sum_K s + sum_S s),    gamma_s = c * s_s / (the same sum),
    c = route_scale * global_scale (route_scale: scaling_factor; global_scale: a learned scalar).

The K gates weigh the routed experts, the S gammas the shared ones. route() computes the
routed gates g = route_scale * s_j (score="sigmoid", normalize=False); this step rescales them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class JointCache:
    gate: np.ndarray  # [T, K] route()'s gates, route_scale * s of the chosen experts (0: dropped)
    shared: np.ndarray  # [T, S] the shared experts' sigmoid scores
    denom: np.ndarray  # [T, 1] sum of the K chosen and S shared scores
    route_scale: float
    global_scale: float


def joint_gates(gate: np.ndarray, shared: np.ndarray, route_scale: float,
                global_scale: float) -> tuple[np.ndarray, np.ndarray, JointCache]:
    """(gates `[T, K]`, gammas `[T, S]`) from route()'s gates `[T, K]` (route_scale * s) and the
    shared scores `[T, S]`."""
    denom = gate.sum(axis=1, keepdims=True) / route_scale + shared.sum(axis=1, keepdims=True)
    out = gate * (global_scale / denom)  # [T, K]
    gamma = shared * (route_scale * global_scale / denom)  # [T, S]
    return out, gamma, JointCache(gate, shared, denom, route_scale, global_scale)


def joint_gates_backward(d_out: np.ndarray, d_gamma: np.ndarray, c: JointCache
                         ) -> tuple[np.ndarray, np.ndarray, float]:
    """(d route()'s gates `[T, K]`, d shared scores `[T, S]`, d global_scale) of joint_gates."""
    r, g = c.route_scale, c.global_scale
    # A = sum_j d_out_j u_j + r sum_s d_gamma_s v_s: everything each token's outputs share
    a = ((d_out * c.gate).sum(axis=1, keepdims=True)
         + r * (d_gamma * c.shared).sum(axis=1, keepdims=True)) / c.denom  # [T, 1]
    d_denom = -g * a / c.denom  # [T, 1]
    d_gate = np.where(c.gate != 0, d_out * (g / c.denom) + d_denom / r, 0)  # [T, K]; 0: dropped
    d_shared = d_gamma * (r * g / c.denom) + d_denom  # [T, S]
    return d_gate, d_shared, float(a.sum())
