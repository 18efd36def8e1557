"""The CPU benchmark as functions: rows for the routed data movement and for the whole layer.

`python -m pymoe.bench` and the examples call these; each returns report.Row objects and prints
nothing.
"""
from __future__ import annotations

import numpy as np

from ..backend import backends, get_backend
from . import torch_peer
from .layer import expert_flops, layer_contenders, sgemm
from .ops import OPS, c_core, make_problem, numpy_dense, numpy_indexed, op_bytes
from .report import Row
from .routing import BEFORE, routing_contenders
from .timing import time_round_robin

COPY = "np.copyto (baseline)"


def bench_ops(T: int, D: int, E: int, K: int, *, capacity_factor: float = 1.25,
              dtype: str = "float32", repeats: int = 7, dense: bool = True,
              torch: bool = True) -> list[Row]:
    """Rows for dispatch, combine and their backward on one problem, every contender interleaved
    with a copy of an expert buffer (the COPY row of each operation, its x-copy denominator).

    dense: include the dense einsum formulation (a row with the reason when memory is short);
    torch: include torch's fastest index-op form (a row with the reason when torch is missing).
    """
    p = make_problem(T, D, E, K, capacity_factor, np.dtype(dtype))
    sec, nbytes, rows = p.label(), op_bytes(p), []
    src, dst = np.ones_like(p.expert_out), np.empty_like(p.expert_out)  # an expert buffer's size
    contenders: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    dense_fns = numpy_dense(p) if dense else {}
    if isinstance(dense_fns, str):
        skipped["numpy dense"] = dense_fns
    elif dense_fns:
        contenders["numpy dense"] = dense_fns
    contenders["numpy indexed"] = numpy_indexed(p)
    c_info = backends()["c"]
    if c_info.available:
        be = get_backend("c")
        contenders["C 1 thread"] = c_core(p, be, 1)
        if be.default_num_threads > 1:
            contenders[f"C {be.default_num_threads} threads"] = c_core(p, be, be.default_num_threads)
    else:
        skipped["C"] = c_info.detail
    torch_ok, torch_why = torch_peer.available()
    variants = torch_peer.torch_op_variants(p) if torch_ok and torch else {}
    if torch and not variants:
        skipped["torch"] = torch_why
    for op in OPS:
        fns = {COPY: lambda: np.copyto(dst, src)}
        fns.update({impl: ops[op] for impl, ops in contenders.items()})
        fns.update({f"torch: {v}": fn for v, fn in variants.get(op, {}).items()})
        times = time_round_robin(fns, repeats)
        copy_gbps = 2 * src.nbytes / times[COPY][0] / 1e9
        rows.append(Row(sec, op, COPY, times.pop(COPY)[0] * 1e3, copy_gbps, 1.0,
                        note=f"{2 * src.nbytes / 1e6:.0f} MB read + written"))
        best_torch = min((n for n in times if n.startswith("torch: ")), key=lambda n: times[n][0],
                         default=None)
        for impl, (t, runs) in times.items():
            if impl.startswith("torch: ") and impl != best_torch:
                continue
            name, note = impl, "" if runs > 1 else "one timed call (slow)"
            if impl == best_torch:
                name, note = "torch (best index-op form)", impl[len("torch: "):]
            gbps = nbytes[op] / t / 1e9
            rows.append(Row(sec, op, name, t * 1e3, gbps, gbps / copy_gbps, note=note))
        for impl, why in skipped.items():
            rows.append(Row(sec, op, impl, None, note=why))
    return rows


def bench_layer(T: int, D: int, H: int, E: int, K: int, *, capacity_factor: float = 1.25,
                repeats: int = 4, dense: bool = True, torch: bool = True) -> list[Row]:
    """Rows for MoELayer forward + backward (float32) per backend and formulation, with torch's
    autograd layer as the peer; GFLOP/s counts the expert matmuls. One large sgemm is timed in
    the same rotation: each layer row's note says its time as a multiple of its expert FLOPs at
    that rate (1.00x = nothing but expert matmuls, each as fast as one big one)."""
    fns, skipped, n_rows = layer_contenders(T, D, H, E, K, capacity_factor, use_torch=torch,
                                            dense=dense)
    calls = max(1, round(expert_flops(n_rows, D, H) / (4 * T * D * H)))  # half the layer's FLOPs
    gemm, gemm_flops, gemm_name = sgemm(T, D, H, calls)
    fns[gemm_name] = gemm
    sec = (f"layer forward+backward: T={T} D={D} H={H} E={E} K={K} capacity_factor="
           f"{capacity_factor:g} float32 ({n_rows} expert rows)")
    times = time_round_robin(fns, repeats)  # the dense layer runs apart (time_round_robin)
    rate = calls * gemm_flops / times[gemm_name][0]
    flops = expert_flops(n_rows, D, H)
    rows = []
    for name, (t, runs) in times.items():
        if name == gemm_name:
            rows.append(Row(sec, "sgemm", name, t / calls * 1e3, gflops=rate / 1e9,
                            note=f"(the rate; {calls} calls per timed sample)"))
            continue
        note = f"{t * rate / flops:.2f}x the sgemm-rate time" + ("" if runs > 1 else
                                                                ", one timed call (slow)")
        rows.append(Row(sec, "fwd+bwd", name, t * 1e3, gflops=flops / t / 1e9, note=note))
    rows += [Row(sec, "fwd+bwd", name, None, note=why) for name, why in skipped.items()]
    return rows


def bench_routing(T: int, E: int, K: int, *, capacity_factor: float = 1.25, repeats: int = 7,
                  scale_D: int | None = None) -> list[Row]:
    """Rows for route() on [T, E] float32 logits: the NumPy reference, the route before top-K
    moved to C, and the C route at 1 and all threads. scale_D: also time C dispatch + combine of
    the problem with that model dim (the data movement this routing feeds), in the rotation."""
    logits = np.random.default_rng(0).normal(size=(T, E)).astype(np.float32)
    fns, skipped = routing_contenders(logits, K, capacity_factor)
    sec = f"route(): T={T} E={E} K={K} capacity_factor={capacity_factor:g} float32 logits"
    if backends()["c"].available and scale_D:
        be = get_backend("c")
        ops = c_core(make_problem(T, scale_D, E, K, capacity_factor, np.dtype(np.float32)), be,
                     be.default_num_threads)
        fns[f"C dispatch + combine, D={scale_D} (for scale)"] = lambda: (ops["dispatch"](),
                                                                          ops["combine"]())
    times = time_round_robin(fns, repeats)
    before = times.get(BEFORE, (None,))[0]
    rows = []
    for name, (t, runs) in times.items():
        note = "" if runs > 1 else "one timed call (slow)"
        if before and not name.startswith(("C dispatch", "numpy top-k", "np.argsort")):
            note = f"{before / t:.1f}x the route before C top-k {note}".strip()
        rows.append(Row(sec, "route", name, t * 1e3, note=note))
    rows += [Row(sec, "route", name, None, note=why) for name, why in skipped.items()]
    return rows


def copy_bandwidth(rows: list[Row]) -> float:
    """The median of the per-operation copy baselines in `rows`, GB/s (read + write)."""
    return float(np.median([r.gbps for r in rows if r.impl == COPY]))
