"""Step 1 variant: product-key routing (Lample et al. 2019, "Large Memory Layers with Product
Keys"; HF Doge's DogeCDMoE), MoELayer(product_keys=...).

The router computes 2n key logits per token (n = sqrt(E)), two halves a, b `[T, n]`, and expert
e = i n + j gets the logit a_i + b_j. HF's Doge takes the top n of each half (all n: n keys each)
and the top K of their n^2 pair sums, which is the top K of these E logits, then a softmax over
the K chosen: pymoe's top-K with normalize=True on them (the renormalised softmax equals the
softmax over the chosen K; variants.scores.softmax_over_top_k). Doge's own aux loss (f = counts /
(T K), P = the softmax over all E pair sums, E sum f P, balanced at 1) is load_balancing="switch"
on the same logits.

layout "per_token": a, b = each token's first and last n key logits. layout "doge": HF's
`router_gate(x).view(2, T, n)`, which reads the `[T, 2n]` logits in memory order, so half a
holds the first T n values (tokens 0..T/2 - 1, both of their halves) and b the rest: a token's
experts depend on other tokens' logits (HF says so in a comment and keeps it for checkpoint
parity).
"""
from __future__ import annotations

import numpy as np

PRODUCT_KEY_LAYOUTS = ("per_token", "doge")


def _halves(keys: np.ndarray, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """(a, b), each `[T, n]`, of the key logits `[T, 2n]`."""
    T, R = keys.shape
    n = R // 2
    if layout == "doge":
        flat = np.ascontiguousarray(keys).reshape(2, T, n)  # HF's view(2, T, n)
        return flat[0], flat[1]
    return keys[:, :n], keys[:, n:]


def product_key_logits(keys: np.ndarray, layout: str) -> np.ndarray:
    """Router logits `[T, E]`, E = n^2: logits[t, i n + j] = a[t, i] + b[t, j] of the key
    logits `[T, 2n]` split by layout."""
    a, b = _halves(keys, layout)  # [T, n] each
    T, n = a.shape
    return (a[:, :, None] + b[:, None, :]).reshape(T, n * n)  # [T, E]


def product_key_logits_backward(dlogits: np.ndarray, layout: str) -> np.ndarray:
    """d key logits `[T, 2n]` of d logits `[T, E]`: da_i = sum_j dL[i n + j], db_j = sum_i."""
    T, E = dlogits.shape
    n = int(round(E ** 0.5))
    d = dlogits.reshape(T, n, n)  # [T, n (a), n (b)]
    da, db = d.sum(axis=2), d.sum(axis=1)  # [T, n] each
    if layout == "doge":
        return np.stack([da, db]).reshape(T, 2 * n)  # the view's inverse
    return np.concatenate([da, db], axis=1)
