"""How HF stores an MoE block's weights, and pymoe's layout for the same numbers.

pymoe computes x @ W: router w_router `[D, E]`, experts w1 `[E, D, 2H]` (gate columns first, then
up, for gated forms), w2 `[E, H, D]`. HF stores most weights as nn.Linear does, `[out, in]`, and
fuses or splits them by family. Each Tensor below maps one or more HF tensors to one pymoe
parameter and back. Every mapping is a permutation of entries (transpose, concatenate,
interleave, reshape), so the same mapping carries gradients: grad_dict(layer) is to_hf applied
to layer.grads. to_hf's arrays are reshaped to the stored shapes by the caller.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Arrays = Sequence[np.ndarray]


@dataclass(frozen=True)
class Tensor:
    """pymoe parameter `param` <-> the HF tensors `keys` (relative to the block).

    to_pymoe(*hf_arrays) -> the parameter; to_hf(parameter) -> the HF arrays, in `keys` order.
    param "expert_bias" is the layer's selection-bias buffer; buffer=True marks HF tensors that
    are not trainable (no .grad: left out of grad_dict).
    """
    param: str
    keys: tuple[str, ...]
    to_pymoe: Callable[..., np.ndarray]
    to_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    buffer: bool = False


def same(param: str, key: str, buffer: bool = False) -> Tensor:
    """Stored as pymoe stores it (biases; `[E, D, 2H]` expert weights used as x @ W)."""
    return Tensor(param, (key,), lambda a: a, lambda p: (p,), buffer)


def flat(param: str, key: str, buffer: bool = False) -> Tensor:
    """A `[1, E]` or `[1, D]` HF tensor (Ernie's bias, Qwen's shared_expert_gate weight) that
    pymoe keeps flat (the converter restores the stored shape)."""
    return Tensor(param, (key,), lambda a: a.reshape(-1).copy(), lambda p: (p,), buffer)


def linear(param: str, key: str) -> Tensor:
    """nn.Linear weight `[out, in]` <-> pymoe `[in, out]` (the router: `[E, D]` <-> `[D, E]`)."""
    return Tensor(param, (key,), lambda a: a.T.copy(), lambda p: (p.T.copy(),))


def stacked(param: str, key: str) -> Tensor:
    """Per-expert nn.Linear weights stacked `[E, out, in]` (gate_up_proj `[E, 2H, D]`, down_proj
    `[E, D, H]`) <-> pymoe `[E, in, out]`."""
    return Tensor(param, (key,), lambda a: a.transpose(0, 2, 1).copy(),
                  lambda p: (p.transpose(0, 2, 1).copy(),))


def interleaved(param: str, key: str, biases: bool = False) -> Tensor:
    """gpt-oss: gate_up_proj `[E, D, 2H]` (or its bias `[E, 2H]`) with gate in the even and up in
    the odd columns (`[..., ::2]`, `[..., 1::2]`) <-> pymoe's gate-then-up halves."""
    def to_pymoe(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a[..., ::2], a[..., 1::2]], axis=-1)

    def to_hf(p: np.ndarray) -> tuple[np.ndarray, ...]:
        h = p.shape[-1] // 2
        out = np.empty_like(p)
        out[..., ::2], out[..., 1::2] = p[..., :h], p[..., h:]
        return (out,)
    return Tensor(param, (key,), to_pymoe, to_hf)


def mlp_gate_up(param: str, gate_key: str, up_key: str) -> Tensor:
    """One MLP's gate_proj and up_proj weights `[Hs, D]` each <-> shared_w1 `[1, D, 2Hs]`."""
    def to_hf(p: np.ndarray) -> tuple[np.ndarray, ...]:
        h = p.shape[2] // 2
        return p[0, :, :h].T.copy(), p[0, :, h:].T.copy()
    return Tensor(param, (gate_key, up_key),
                  lambda g, u: np.concatenate([g.T, u.T], axis=1)[None].copy(), to_hf)


def mlp_linear(param: str, key: str) -> Tensor:
    """One MLP's nn.Linear weight `[out, in]` <-> a one-expert stack `[1, in, out]` (a shared
    expert's down_proj, or a fused gate_up `[2Hs, D]`)."""
    return Tensor(param, (key,), lambda a: a.T[None].copy(), lambda p: (p[0].T.copy(),))


def per_expert(param: str, pattern: str, num_experts: int, inner: Callable[[str], Tensor]) -> Tensor:
    """Per-expert modules (Switch, NLLB: experts.expert_{i}.wi.weight): `pattern` holds `{i}`;
    inner(key) maps one expert's tensor to its `[in, out]` slice."""
    keys = tuple(pattern.format(i=i) for i in range(num_experts))
    one = inner(keys[0])

    def to_pymoe(*arrays: np.ndarray) -> np.ndarray:
        return np.stack([one.to_pymoe(a) for a in arrays])

    def to_hf(p: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(one.to_hf(p[i])[0] for i in range(num_experts))
    return Tensor(param, keys, to_pymoe, to_hf)


def dbrx_flat(param: str, keys: tuple[str, ...], num_experts: int, transpose: bool) -> Tensor:
    """DBRX: w1, v1, w2 each `[E*H, D]`. w1 (gate) and v1 (up) are x @ W.T, w2 is used as stored
    (h @ w2[e], `[H, D]` per expert): keys (w1, v1) -> pymoe w1 `[E, D, 2H]`; (w2,) -> w2."""
    E = num_experts
    if transpose:
        def to_pymoe(g: np.ndarray, u: np.ndarray) -> np.ndarray:
            H = g.shape[0] // E
            return np.concatenate([g.reshape(E, H, -1), u.reshape(E, H, -1)],
                                  axis=1).transpose(0, 2, 1).copy()

        def to_hf(p: np.ndarray) -> tuple[np.ndarray, ...]:
            H = p.shape[2] // 2
            D = p.shape[1]
            t = p.transpose(0, 2, 1)
            return t[:, :H].reshape(E * H, D).copy(), t[:, H:].reshape(E * H, D).copy()
        return Tensor(param, keys, to_pymoe, to_hf)
    return Tensor(param, keys, lambda a: a.reshape(E, a.shape[0] // E, -1).copy(),
                  lambda p: (p.reshape(-1, p.shape[2]).copy(),))


def embed_rows(param: str, key: str, into: bool) -> Tensor:
    """Doge's single-neuron experts: an nn.Embedding `[E, D]` of one D-vector per expert <->
    into=True: w1 `[E, D, 1]` (down_embed: x . d_e); into=False: w2 `[E, 1, D]` (up_embed)."""
    if into:
        return Tensor(param, (key,), lambda a: a[:, :, None].copy(), lambda p: (p[:, :, 0].copy(),))
    return Tensor(param, (key,), lambda a: a[:, None, :].copy(), lambda p: (p[:, 0, :].copy(),))
