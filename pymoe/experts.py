"""Step 11b: the experts, E independent two-layer feed-forward networks D -> H -> D.

expert_out[e] = act(expert_in[e] @ w1[e] + b1[e]) @ w2[e] + b2[e], batched over experts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    from .backend.protocol import Backend

_GELU_C = np.sqrt(2.0 / np.pi)


# Each activation comes as a pair: act(a, out) writes act(a) into out; act_backward(da, a) scales
# the incoming gradient da in place by act'(a). In place, because these [rows, H] arrays are the
# largest the layer touches outside the matmuls.

def relu(a: np.ndarray, out: np.ndarray) -> None:
    """out = max(a, 0), with +0.0 where a is -0.0 (the C epilogue's rule): IEEE leaves the sign of
    max(-0, +0) open and NumPy's answer depends on its version and SIMD loop, so `+= 0.0` fixes it
    (-0 + 0 = +0; every other value, NaN included, passes unchanged)."""
    np.maximum(a, 0, out=out)
    out += 0.0


def relu_backward(grad: np.ndarray, a: np.ndarray) -> None:
    """grad *= relu'(a); at a == 0 the derivative is taken as 0. a may be the pre-activation or
    relu's output (a > 0 exactly where relu(a) > 0), which is what the filled-rows path keeps."""
    np.multiply(grad, a > 0, out=grad)


def gelu(a: np.ndarray, out: np.ndarray) -> None:
    """GELU, tanh form (Hendrycks & Gimpel 2016; GPT-2, llm.c): 0.5 a (1 + tanh(c (a + 0.044715 a^3)))."""
    out[...] = 0.5 * a * (1.0 + np.tanh(_GELU_C * (a + 0.044715 * a ** 3)))


def gelu_backward(grad: np.ndarray, a: np.ndarray) -> None:
    """grad *= gelu'(a) of the tanh form."""
    th = np.tanh(_GELU_C * (a + 0.044715 * a ** 3))
    grad *= 0.5 * (1.0 + th) + 0.5 * a * (1.0 - th * th) * _GELU_C * (1.0 + 3 * 0.044715 * a * a)


def bias_relu(a: np.ndarray, bias: np.ndarray) -> None:
    """a = relu(a + bias) in place: the first layer's epilogue on one expert's `[n, H]` block
    (a: the matmul's output; bias `[H]`). The C twin (pymoe_bias_relu) makes it one pass, as
    pymoe_relu_backward does for relu_backward."""
    a += bias
    relu(a, a)


EXPERT_PARAMS = ("w1", "b1", "w2", "b2")  # w1 [E, D, H], b1 [E, H], w2 [E, H, D], b2 [E, D]
ACTIVATIONS: dict[str, tuple[Callable[[np.ndarray, np.ndarray], None],
                             Callable[[np.ndarray, np.ndarray], None]]] = {
    "relu": (relu, relu_backward),
    "gelu": (gelu, gelu_backward),
}


@dataclass
class ExpertsCache:
    """What experts_backward needs from the forward pass."""
    expert_in: np.ndarray  # [E, C, D]
    pre: np.ndarray | None  # [E, C, H] pre-activation (None for relu on filled rows: hidden says)
    hidden: np.ndarray  # [E, C, H] post-activation
    filled: np.ndarray | None  # [E] rows used per expert, or None for all C
    activation: str


class _NumpyEpilogues:
    """bias_relu and relu_backward without argument checks: what experts_forward and
    experts_backward use when no backend brings its own (their arrays are their own buffers)."""
    bias_relu = staticmethod(bias_relu)
    relu_backward = staticmethod(relu_backward)


def _buffer(workspace: dict | None, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array, reused from `workspace` when it holds one of that shape and dtype.

    A layer passes the same dict every step: its [E, C, H] and [E, C, D] buffers are tens of MB,
    and a fresh one costs a page fault per 4 KiB on first touch, every step.
    """
    if workspace is None:
        return np.empty(shape, dtype)
    buf = workspace.get(name)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buf = workspace[name] = np.empty(shape, dtype)
    return buf


def experts_forward(expert_in: np.ndarray, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray,
                    b2: np.ndarray, activation: str = "relu", filled: np.ndarray | None = None,
                    workspace: dict | None = None,
                    backend: Backend | None = None) -> tuple[np.ndarray, ExpertsCache]:
    """Run every expert on its slots.

    Args:
        expert_in: `[E, C, D]`; w1 `[E, D, H]`, b1 `[E, H]`, w2 `[E, H, D]`, b2 `[E, D]`.
        filled: `<int>[E]` or None. With None every slot is computed in one batched matmul (the
            dense formulation). Given, expert e runs on its first filled[e] slots only, the ones
            that hold tokens (slots fill from the front), and the rest of expert_out stays 0:
            the padded capacity costs no FLOPs.
        workspace: a dict the caller keeps between calls (MoELayer does) to reuse the output and
            activation buffers; the previous call's results in it are overwritten.
        backend: whose bias_relu runs relu's epilogue on filled rows (the C backend's is one
            pass, the same bits); None: this module's.
    Returns:
        expert_out `[E, C, D]` and the cache for experts_backward.
    """
    act, _ = ACTIVATIONS[activation]
    if filled is None:
        pre = np.matmul(expert_in, w1) + b1[:, None, :]  # [E, C, H]
        hidden = np.empty_like(pre)  # [E, C, H]
        act(pre, hidden)
        out = np.matmul(hidden, w2) + b2[:, None, :]  # [E, C, D]
        return out, ExpertsCache(expert_in, pre, hidden, None, activation)
    E, C, D = expert_in.shape
    H = w1.shape[2]
    dt = np.result_type(expert_in.dtype, w1.dtype)
    relu = activation == "relu"
    ops = backend if relu and backend is not None else _NumpyEpilogues
    # Rows past filled[e] of pre and hidden are never read (backward reads the filled rows only).
    # relu keeps no pre-activation: its derivative is read from hidden > 0.
    pre = None if relu else _buffer(workspace, "pre", (E, C, H), dt)  # [E, C, H]
    hidden = _buffer(workspace, "hidden", (E, C, H), dt)  # [E, C, H]
    out = _buffer(workspace, "out", (E, C, D), dt)  # [E, C, D]
    for e in range(E):
        n = int(filled[e])
        out[e, n:] = 0
        if n == 0:
            continue
        if pre is None:
            np.matmul(expert_in[e, :n], w1[e], out=hidden[e, :n])  # [n, H]
            ops.bias_relu(hidden[e, :n], b1[e])  # [n, H]
        else:
            np.matmul(expert_in[e, :n], w1[e], out=pre[e, :n])  # [n, H]
            pre[e, :n] += b1[e]
            act(pre[e, :n], hidden[e, :n])  # [n, H]
        np.matmul(hidden[e, :n], w2[e], out=out[e, :n])  # [n, D]
        out[e, :n] += b2[e]
    return out, ExpertsCache(expert_in, pre, hidden, filled, activation)


def experts_backward(d_expert_out: np.ndarray, w1: np.ndarray, w2: np.ndarray,
                     cache: ExpertsCache, workspace: dict | None = None,
                     backend: Backend | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Backward of experts_forward.

    Args:
        d_expert_out: `[E, C, D]` (rows past filled[e] are ignored).
        workspace: as for experts_forward (holds d_expert_in between calls).
        backend: whose relu_backward runs relu's backward epilogue (as for experts_forward).
    Returns:
        d_expert_in `[E, C, D]` (0 past filled[e]) and fresh gradients {w1, b1, w2, b2} with the
        parameters' shapes.
    """
    _, act_backward = ACTIVATIONS[cache.activation]
    if cache.filled is None:
        assert cache.pre is not None  # the dense path always keeps it
        dw2 = np.matmul(cache.hidden.transpose(0, 2, 1), d_expert_out)  # [E, H, D]
        db2 = d_expert_out.sum(axis=1)  # [E, D]
        dpre = np.matmul(d_expert_out, w2.transpose(0, 2, 1))  # [E, C, H]
        act_backward(dpre, cache.pre)
        dw1 = np.matmul(cache.expert_in.transpose(0, 2, 1), dpre)  # [E, D, H]
        db1 = dpre.sum(axis=1)  # [E, H]
        d_in = np.matmul(dpre, w1.transpose(0, 2, 1))  # [E, C, D]
        return d_in, {"w1": dw1, "b1": db1, "w2": dw2, "b2": db2}
    E, C, D = cache.expert_in.shape
    H = w1.shape[2]
    dt = d_expert_out.dtype
    ops = backend if cache.pre is None and backend is not None else _NumpyEpilogues
    d_in = _buffer(workspace, "d_in", (E, C, D), dt)
    dpre_buf = _buffer(workspace, "dpre", (C, H), dt)  # one expert's, reused by the next
    dw1, db1 = np.empty((E, D, H), dtype=dt), np.empty((E, H), dtype=dt)
    dw2, db2 = np.empty((E, H, D), dtype=dt), np.empty((E, D), dtype=dt)
    for e in range(E):
        n = int(cache.filled[e])
        d_in[e, n:] = 0
        if n == 0:  # an expert without tokens gets zero gradients
            dw1[e], db1[e], dw2[e], db2[e] = 0, 0, 0, 0
            continue
        dout = d_expert_out[e, :n]  # [n, D]
        np.matmul(cache.hidden[e, :n].T, dout, out=dw2[e])  # [H, D]
        db2[e] = dout.sum(axis=0)
        dpre = np.matmul(dout, w2[e].T, out=dpre_buf[:n])  # [n, H]
        if cache.pre is None:  # relu: the mask from hidden
            ops.relu_backward(dpre, cache.hidden[e, :n])
        else:
            act_backward(dpre, cache.pre[e, :n])
        db1[e] = dpre.sum(axis=0)
        np.matmul(cache.expert_in[e, :n].T, dpre, out=dw1[e])  # [D, H]
        np.matmul(dpre, w1[e].T, out=d_in[e, :n])  # [n, D]
    return d_in, {"w1": dw1, "b1": db1, "w2": dw2, "b2": db2}
