"""transformers' shared load_balancing_loss_func (31 families call it), in NumPy.

What it computes, quirks included (transformers 5.24, e.g. models/mixtral/modeling_mixtral.py):
- It pools every layer: counts and probabilities are summed over all layers' rows and divided by
  the total row count once (L*T, or the mask's sum times L); it is not the mean of per-layer
  losses.
- It recomputes the selection as a plain softmax top-K of each layer's logits: for sigmoid
  routers, selection biases or group limits it balances a selection the model never makes.
- loss = E * sum_e f_e P_e with f_e the share of the K*rows choices (summing to K), so a
  balanced router scores K, not 1.
- HF returns the integer 0 when router_logits is not a tuple; here a list or one array is
  taken as well (one array: one layer).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .. import _checks
from ..router import softmax


def load_balancing_loss(router_logits: Sequence[np.ndarray] | np.ndarray, num_experts: int,
                        top_k: int, attention_mask: np.ndarray | None = None) -> float:
    """HF's load-balancing loss of a model's router logits.

    Args:
        router_logits: one `[B*S, E]` array per MoE layer (HF's outputs.router_logits), or one
            array for one layer.
        num_experts: E; top_k: K (the model's num_experts_per_tok).
        attention_mask: `[B, S]` 0/1 (padding rows count nowhere), or None.
    Returns:
        the loss as a float (computed in float64: HF sums in float32, so the two agree to
        float32 round-off).
    """
    layers = [router_logits] if isinstance(router_logits, np.ndarray) else list(router_logits)
    if not layers:
        raise ValueError("router_logits: expected at least one layer's logits, got none")
    E = _checks.integer("num_experts", num_experts, low=1)
    K = _checks.integer("top_k", top_k, low=1)
    if K > E:
        raise ValueError(f"top_k: expected 1 <= top_k <= num_experts = {E}, got {K}")
    mask = None
    if attention_mask is not None:
        mask = np.asarray(attention_mask, dtype=np.float64).reshape(-1)
    counts = np.zeros(E)
    probs = np.zeros(E)
    rows = 0.0
    for i, logits in enumerate(layers):
        logits = _checks.float_array(f"router_logits[{i}]", logits, shape=(None, E))
        if mask is not None and mask.shape[0] != logits.shape[0]:
            raise ValueError(f"attention_mask: expected {logits.shape[0]} entries (the rows of "
                             f"router_logits[{i}]), got {mask.shape[0]}")
        p = softmax(logits.astype(np.float64))  # [T, E]
        # top-K by probability; ties are measure-zero for real logits
        chosen = np.argsort(-p, axis=1, kind="stable")[:, :K]  # [T, K]
        w = np.ones(p.shape[0]) if mask is None else mask  # [T]
        np.add.at(counts, chosen.ravel(), np.repeat(w, K))
        probs += (p * w[:, None]).sum(axis=0)
        rows += float(w.sum())
    if rows == 0:
        raise ValueError("attention_mask: every row is masked out; the loss is 0/0")
    return float(E * np.sum(counts / rows * (probs / rows)))
