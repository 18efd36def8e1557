"""Step 11b on the grouped GEMM: experts_forward / experts_backward's filled-rows path with the
expert matmuls batched into one BLAS call per phase (pymoe.backend.grouped_gemm), what the C
backend runs when NumPy's OpenBLAS exports cblas_sgemm_batch.

The same steps as pymoe.experts, in phases instead of expert by expert: forward = [all first
matmuls] -> per expert bias + epilogue -> [all second matmuls] -> bias; backward = [dw2 and dh of
every expert] -> per expert db2 + the epilogue's backward + db1 -> [dw1 and d_in of every expert].
Only the filled rows enter a matmul. The epilogues and bias sums are the loop's own, so the values
differ from the loop's only where BLAS rounds a matmul differently (tests hold it to a tolerance).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .expert_forms import FormSpec


def grouped_forward(gg: Any, ops: Any, expert_in: np.ndarray, w1: np.ndarray, b1: np.ndarray,
                    w2: np.ndarray, b2: np.ndarray, spec: FormSpec, filled: np.ndarray,
                    pre: np.ndarray | None, hidden: np.ndarray, out: np.ndarray) -> None:
    """Fill hidden `[E, C, H]`, out `[E, C, D]` (0 past filled[e]) and pre `[E, C, W]` (None for
    relu) as experts_forward's loop does; gg: a GroupedGemm, ops: the epilogues' owner."""
    ns = [int(n) for n in filled]
    live = [e for e, n in enumerate(ns) if n]
    for e, n in enumerate(ns):
        out[e, n:] = 0
    first = hidden if pre is None else pre
    gg.matmul([(expert_in[e, :ns[e]], w1[e], first[e, :ns[e]]) for e in live])  # [n, W]
    for e in live:
        n = ns[e]
        if pre is None:
            ops.bias_relu(hidden[e, :n], b1[e])  # [n, H]
        else:
            ops.form_forward(spec.name, pre[e, :n], hidden[e, :n], *spec.args,
                             bias=b1[e])  # pre += b1, then h [n, H]
    gg.matmul([(hidden[e, :ns[e]], w2[e], out[e, :ns[e]]) for e in live])  # [n, D]
    for e in live:
        out[e, :ns[e]] += b2[e]


def grouped_backward(gg: Any, ops: Any, d_expert_out: np.ndarray, w1: np.ndarray,
                     w2: np.ndarray, expert_in: np.ndarray, pre: np.ndarray | None,
                     hidden: np.ndarray, spec: FormSpec, filled: np.ndarray, d_in: np.ndarray,
                     dh_all: np.ndarray, dpre_all: np.ndarray | None,
                     grads: dict[str, np.ndarray]) -> None:
    """experts_backward's loop in phases: fills d_in `[E, C, D]` (0 past filled[e]) and grads
    {w1, b1, w2, b2} (zeros for an expert without tokens); dh_all `[E, C, H]`, dpre_all
    `[E, C, W]` (None for relu): scratch, every expert's at once (the phases need them all)."""
    dw1, db1, dw2, db2 = grads["w1"], grads["b1"], grads["w2"], grads["b2"]
    ns = [int(n) for n in filled]
    live = [e for e, n in enumerate(ns) if n]
    for e, n in enumerate(ns):
        d_in[e, n:] = 0
        if n == 0:
            dw1[e], db1[e], dw2[e], db2[e] = 0, 0, 0, 0
    dout = [d_expert_out[e, :ns[e]] for e in range(len(ns))]  # [n, D]
    gg.matmul([(hidden[e, :ns[e]].T, dout[e], dw2[e]) for e in live]  # [H, D]
              + [(dout[e], w2[e].T, dh_all[e, :ns[e]]) for e in live])  # [n, H]
    dpre_of = []
    for e in live:
        n = ns[e]
        db2[e] = dout[e].sum(axis=0)
        dh = dh_all[e, :n]
        if pre is None:  # relu: the mask from hidden
            ops.relu_backward(dh, hidden[e, :n])
            dpre = dh
        else:
            assert dpre_all is not None
            dpre = dpre_all[e, :n]  # [n, W]
            ops.form_backward(spec.name, dh, pre[e, :n], dpre, *spec.args)
        db1[e] = dpre.sum(axis=0)
        dpre_of.append(dpre)
    gg.matmul([(expert_in[e, :ns[e]].T, dp, dw1[e]) for e, dp in zip(live, dpre_of)]  # [D, W]
              + [(dp, w1[e].T, d_in[e, :ns[e]]) for e, dp in zip(live, dpre_of)])  # [n, D]
