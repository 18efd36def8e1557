"""An independent, loop-by-loop implementation of the routing semantics, for the tests only.

Written from the convention list in pymoe's docstrings with plain Python loops and math (no NumPy
vectorisation, no shared code with pymoe), so that agreement means the semantics agree, not that
the same code ran twice. The priority order for "score" routing takes the reference's own
probabilities as its key: softmax rounding is compared separately, with a tolerance.
"""
from __future__ import annotations

import math
from decimal import Decimal

import numpy as np


def oracle_route(logits, probs, num_experts, k, capacity_factor, min_capacity, normalize,
                 priority):
    """Route with loops. logits, probs: nested lists or arrays [T][E]. Returns a dict."""
    T, E = len(logits), num_experts
    L = [[float(v) for v in row] for row in logits]
    P = [[float(v) for v in row] for row in probs]
    # top-K by logit, ties to the lower expert
    index = [sorted(range(E), key=lambda e: (-L[t][e], e))[:k] for t in range(T)]
    gate = []
    for t in range(T):
        g = [P[t][e] for e in index[t]]
        if normalize:
            s = sum(g)
            g = [v / s for v in g]
        gate.append(g)
    load = [0] * E
    for t in range(T):
        for e in index[t]:
            load[e] += 1
    if capacity_factor is None:
        cap = max(load) if T else 0
    else:
        cap = math.ceil(k * T * Decimal(repr(capacity_factor)) / E)  # exact decimal arithmetic
    cap = min(max(cap, min_capacity), T)
    if priority == "choice":
        order = list(range(T))
    else:
        order = sorted(range(T), key=lambda t: (-max(P[t]), t))
    count = [0] * E
    position = [[-1] * k for _ in range(T)]
    for j in range(k):  # choice-major: every first choice before any second choice
        for t in order:
            e = index[t][j]
            if count[e] < cap:
                position[t][j] = count[e]
            count[e] += 1
    kept = [[position[t][j] >= 0 for j in range(k)] for t in range(T)]
    gate_kept = [[gate[t][j] if kept[t][j] else 0.0 for j in range(k)] for t in range(T)]
    dispatch = np.zeros((T, E, cap), dtype=bool)
    combine = np.zeros((T, E, cap))
    for t in range(T):
        for j in range(k):
            if kept[t][j]:
                dispatch[t, index[t][j], position[t][j]] = True
                combine[t, index[t][j], position[t][j]] = gate[t][j]
    if T:
        aux = E * sum(load[e] / (T * k) * sum(P[t][e] for t in range(T)) / T for e in range(E))
        z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in L) / T
    else:
        aux = z = 0.0
    return dict(expert_index=np.array(index, dtype=np.int64).reshape(T, k),
                gate=np.array(gate_kept).reshape(T, k), position=np.array(position).reshape(T, k),
                kept=np.array(kept, dtype=bool).reshape(T, k), capacity=cap,
                expert_load=np.array(load), token_order=np.array(order, dtype=np.int64),
                dispatch_mask=dispatch, combine_weights=combine, aux_loss=aux, z_loss=z)


def oracle_softmax(logits):
    out = []
    for row in logits:
        m = max(row)
        ex = [math.exp(v - m) for v in row]
        s = sum(ex)
        out.append([v / s for v in ex])
    return np.array(out)


def oracle_layer_forward(layer, x):
    """y [T, D] token by token: y[t] = sum over kept j of gate * FFN_e(x[t]), in float64 loops."""
    p = {n: v.astype(np.float64) for n, v in layer.params.items()}
    act = {"relu": lambda a: np.maximum(a, 0.0),
           "gelu": lambda a: 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))
           }[layer.activation]
    x = np.asarray(x, dtype=np.float64).reshape(-1, layer.d_model)
    logits = x @ p["w_router"] + p["b_router"]
    probs = oracle_softmax(logits.tolist()) if len(x) else np.zeros((0, layer.num_experts))
    r = oracle_route(logits, probs, layer.num_experts, layer.k, layer.capacity_factor, layer.min_capacity,
                     layer.normalize, layer.priority)
    y = np.zeros_like(x)
    for t in range(len(x)):
        for j in range(layer.k):
            if r["kept"][t, j]:
                e = r["expert_index"][t, j]
                h = act(x[t] @ p["w1"][e] + p["b1"][e])
                y[t] += r["gate"][t, j] * (h @ p["w2"][e] + p["b2"][e])
    return y, r
