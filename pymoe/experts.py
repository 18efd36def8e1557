"""Step 11b: the experts, E independent feed-forward networks D -> H -> D.

expert_out[e] = form(expert_in[e] @ w1[e] + b1[e]) @ w2[e] + b2[e], batched over experts; `form`
is one of pymoe.expert_forms.EXPERT_FORMS (relu, gelu, relu2 and the gated GLUs, whose w1 `[E, D,
2H]` holds the gate columns first, then the up ones). relu keeps its own epilogues here, below.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .expert_forms import FormSpec, form_spec
from .experts_grouped import grouped_backward, grouped_forward

if TYPE_CHECKING:
    from .backend.protocol import Backend

# relu's pair: relu(a, out) writes relu(a) into out; relu_backward(da, a) scales the incoming
# gradient da in place by relu'(a). In place, because these [rows, H] arrays are the largest the
# layer touches outside the matmuls. The other forms' pairs are in pymoe.expert_forms.

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


def bias_relu(a: np.ndarray, bias: np.ndarray) -> None:
    """a = relu(a + bias) in place: the first layer's epilogue on one expert's `[n, H]` block
    (a: the matmul's output; bias `[H]`). The C twin (pymoe_bias_relu) makes it one pass, as
    pymoe_relu_backward does for relu_backward."""
    a += bias
    relu(a, a)


EXPERT_PARAMS = ("w1", "b1", "w2", "b2")  # w1 [E, D, W], b1 [E, W], w2 [E, H, D], b2 [E, D]
# W = H, or 2H for a gated form


@dataclass
class ExpertsCache:
    """What experts_backward needs from the forward pass."""
    expert_in: np.ndarray  # [E, C, D]
    pre: np.ndarray | None  # [E, C, W] pre-activation (None for relu on filled rows: hidden says)
    hidden: np.ndarray  # [E, C, H] post-activation
    filled: np.ndarray | None  # [E] rows used per expert, or None for all C
    form: FormSpec


class _NumpyEpilogues:
    """The epilogues without argument checks: what experts_forward and experts_backward use when
    no backend brings its own (their arrays are their own buffers)."""
    bias_relu = staticmethod(bias_relu)
    relu_backward = staticmethod(relu_backward)

    @staticmethod
    def form_forward(form: str, a: np.ndarray, out: np.ndarray, *args: float,
                     bias: np.ndarray | None = None) -> None:
        if bias is not None:
            a += bias
        FormSpec(form, args).forward(a, out)

    @staticmethod
    def form_backward(form: str, dh: np.ndarray, a: np.ndarray, out: np.ndarray,
                      *args: float) -> None:
        FormSpec(form, args).backward(dh, a, out)


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
                    b2: np.ndarray, activation: str | FormSpec = "relu",
                    filled: np.ndarray | None = None, workspace: dict | None = None,
                    backend: Backend | None = None) -> tuple[np.ndarray, ExpertsCache]:
    """Run every expert on its slots.

    Args:
        expert_in: `[E, C, D]`; w1 `[E, D, W]`, b1 `[E, W]`, w2 `[E, H, D]`, b2 `[E, D]`, with
            W = 2H for a gated form (gate columns first), else H.
        activation: a form's name (its default arguments) or a FormSpec (expert_forms.form_spec,
            what MoELayer passes, with its swiglu_limit, ...).
        filled: `<int>[E]` or None. With None every slot is computed in one batched matmul (the
            dense formulation). Given, expert e runs on its first filled[e] slots only, the ones
            that hold tokens (slots fill from the front), and the rest of expert_out stays 0:
            the padded capacity costs no FLOPs.
        workspace: a dict the caller keeps between calls (MoELayer does) to reuse the output and
            activation buffers; the previous call's results in it are overwritten.
        backend: whose epilogue runs the form on filled rows (bias_relu for relu, form_forward
            for the others; the C backend's are one pass, the same bits); None: NumPy's. A
            backend with a grouped_gemm (the C one, when NumPy's OpenBLAS has
            cblas_sgemm_batch) also batches the expert matmuls (pymoe.experts_grouped).
    Returns:
        expert_out `[E, C, D]` and the cache for experts_backward.
    """
    spec = form_spec(activation)
    is_relu = spec.name == "relu"
    if filled is None:
        pre = np.matmul(expert_in, w1) + b1[:, None, :]  # [E, C, W]
        hidden = np.empty(pre.shape[:2] + w2.shape[1:2], pre.dtype)  # [E, C, H]
        if is_relu:
            relu(pre, hidden)
        else:
            spec.forward(pre, hidden)
        out = np.matmul(hidden, w2) + b2[:, None, :]  # [E, C, D]
        return out, ExpertsCache(expert_in, pre, hidden, None, spec)
    E, C, D = expert_in.shape
    W, H = w1.shape[2], w2.shape[1]
    dt = np.result_type(expert_in.dtype, w1.dtype)
    ops = backend if backend is not None else _NumpyEpilogues
    # Rows past filled[e] of pre and hidden are never read (backward reads the filled rows only).
    # relu keeps no pre-activation: its derivative is read from hidden > 0.
    pre = None if is_relu else _buffer(workspace, "pre", (E, C, W), dt)  # [E, C, W]
    hidden = _buffer(workspace, "hidden", (E, C, H), dt)  # [E, C, H]
    out = _buffer(workspace, "out", (E, C, D), dt)  # [E, C, D]
    gg = getattr(backend, "grouped_gemm", None)  # the C backend's, when BLAS has one
    if gg is not None:
        grouped_forward(gg, ops, expert_in, w1, b1, w2, b2, spec, filled, pre, hidden, out)
        return out, ExpertsCache(expert_in, pre, hidden, filled, spec)
    for e in range(E):
        n = int(filled[e])
        out[e, n:] = 0
        if n == 0:
            continue
        if pre is None:
            np.matmul(expert_in[e, :n], w1[e], out=hidden[e, :n])  # [n, H]
            ops.bias_relu(hidden[e, :n], b1[e])  # [n, H]
        else:
            np.matmul(expert_in[e, :n], w1[e], out=pre[e, :n])  # [n, W]
            # pre += b1, then the form: one pass in C
            ops.form_forward(spec.name, pre[e, :n], hidden[e, :n], *spec.args, bias=b1[e])
        np.matmul(hidden[e, :n], w2[e], out=out[e, :n])  # [n, D]
        out[e, :n] += b2[e]
    return out, ExpertsCache(expert_in, pre, hidden, filled, spec)


def experts_backward(d_expert_out: np.ndarray, w1: np.ndarray, w2: np.ndarray,
                     cache: ExpertsCache, workspace: dict | None = None,
                     backend: Backend | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Backward of experts_forward.

    Args:
        d_expert_out: `[E, C, D]` (rows past filled[e] are ignored).
        workspace: as for experts_forward (holds d_expert_in between calls).
        backend: whose epilogue runs the form's backward (as for experts_forward).
    Returns:
        d_expert_in `[E, C, D]` (0 past filled[e]) and fresh gradients {w1, b1, w2, b2} with the
        parameters' shapes.
    """
    spec = cache.form
    if cache.filled is None:
        assert cache.pre is not None  # the dense path always keeps it
        dw2 = np.matmul(cache.hidden.transpose(0, 2, 1), d_expert_out)  # [E, H, D]
        db2 = d_expert_out.sum(axis=1)  # [E, D]
        dh = np.matmul(d_expert_out, w2.transpose(0, 2, 1))  # [E, C, H]
        if spec.name == "relu":
            relu_backward(dh, cache.pre)
            dpre = dh
        else:
            dpre = np.empty_like(cache.pre)  # [E, C, W]
            spec.backward(dh, cache.pre, dpre)
        dw1 = np.matmul(cache.expert_in.transpose(0, 2, 1), dpre)  # [E, D, W]
        db1 = dpre.sum(axis=1)  # [E, W]
        d_in = np.matmul(dpre, w1.transpose(0, 2, 1))  # [E, C, D]
        return d_in, {"w1": dw1, "b1": db1, "w2": dw2, "b2": db2}
    E, C, D = cache.expert_in.shape
    W, H = w1.shape[2], w2.shape[1]
    dt = d_expert_out.dtype
    ops = backend if backend is not None else _NumpyEpilogues
    d_in = _buffer(workspace, "d_in", (E, C, D), dt)
    dw1, db1 = np.empty((E, D, W), dtype=dt), np.empty((E, W), dtype=dt)
    dw2, db2 = np.empty((E, H, D), dtype=dt), np.empty((E, D), dtype=dt)
    gg = getattr(backend, "grouped_gemm", None)
    if gg is not None:  # the phases need every expert's dh and dpre at once
        grads = {"w1": dw1, "b1": db1, "w2": dw2, "b2": db2}
        dpre_all = None if cache.pre is None else _buffer(workspace, "dpre_all", (E, C, W), dt)
        grouped_backward(gg, ops, d_expert_out, w1, w2, cache.expert_in, cache.pre,
                         cache.hidden, spec, cache.filled, d_in,
                         _buffer(workspace, "dh_all", (E, C, H), dt), dpre_all, grads)
        return d_in, grads
    dh_buf = _buffer(workspace, "dpre", (C, H), dt)  # one expert's, reused by the next
    dpre_buf = None if cache.pre is None else _buffer(workspace, "dpre_w", (C, W), dt)
    for e in range(E):
        n = int(cache.filled[e])
        d_in[e, n:] = 0
        if n == 0:  # an expert without tokens gets zero gradients
            dw1[e], db1[e], dw2[e], db2[e] = 0, 0, 0, 0
            continue
        dout = d_expert_out[e, :n]  # [n, D]
        np.matmul(cache.hidden[e, :n].T, dout, out=dw2[e])  # [H, D]
        db2[e] = dout.sum(axis=0)
        dh = np.matmul(dout, w2[e].T, out=dh_buf[:n])  # [n, H]
        if cache.pre is None:  # relu: the mask from hidden
            ops.relu_backward(dh, cache.hidden[e, :n])
            dpre = dh
        else:
            assert dpre_buf is not None
            dpre = dpre_buf[:n]  # [n, W]
            ops.form_backward(spec.name, dh, cache.pre[e, :n], dpre, *spec.args)
        db1[e] = dpre.sum(axis=0)
        np.matmul(cache.expert_in[e, :n].T, dpre, out=dw1[e])  # [D, W]
        np.matmul(dpre, w1[e].T, out=d_in[e, :n])  # [n, D]
    return d_in, {"w1": dw1, "b1": db1, "w2": dw2, "b2": db2}
