"""The routed data movement on one problem, by every CPU implementation, with its byte counts.

Four operations (shapes in the legend of pymoe.router):
    dispatch       x [T, D] -> expert_in [E, C, D]
    combine        expert_out [E, C, D], gate [T, K] -> y [T, D]
    dispatch_bwd   d_expert_in [E, C, D] -> dx [T, D]            (a combine with unit weights)
    combine_bwd    dy [T, D] -> d_expert_out [E, C, D], dgate [T, K]  (a weighted dispatch + dots)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..dense import (
    combine_dense,
    combine_dense_backward,
    dispatch_dense,
    dispatch_dense_backward,
    gate_grad_from_dense,
)
from ..indexed import combine_indexed, dispatch_indexed, gate_grad_indexed
from ..routing import Routing, route

OPS = ("dispatch", "combine", "dispatch_bwd", "combine_bwd")
INDEX_BYTES = 8  # int64 indices


@dataclass
class Problem:
    T: int
    D: int
    E: int
    K: int
    capacity_factor: float
    dtype: np.dtype
    routing: Routing
    x: np.ndarray  # [T, D]
    dy: np.ndarray  # [T, D]
    expert_out: np.ndarray  # [E, C, D]
    gate: np.ndarray  # [T, K] in dtype

    @property
    def C(self) -> int:
        return self.routing.capacity

    @property
    def kept(self) -> int:
        return int(self.routing.kept.sum())

    def label(self) -> str:
        return (f"T={self.T} D={self.D} E={self.E} K={self.K} capacity_factor="
                f"{self.capacity_factor:g} {self.dtype.name} (C={self.C}, {self.kept} of "
                f"{self.T * self.K} pairs kept)")


def make_problem(T: int, D: int, E: int, K: int, capacity_factor: float, dtype: np.dtype,
                 seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    r = route(rng.normal(size=(T, E)).astype(np.float32), K, capacity_factor)
    x = rng.standard_normal((T, D), dtype=np.float32).astype(dtype)
    dy = rng.standard_normal((T, D), dtype=np.float32).astype(dtype)
    expert_out = rng.standard_normal((E, r.capacity, D), dtype=np.float32).astype(dtype)
    return Problem(T, D, E, K, capacity_factor, np.dtype(dtype), r, x, dy, expert_out,
                   r.gate.astype(dtype))


def op_bytes(p: Problem) -> dict[str, int]:
    """Bytes each operation must read plus write (the GB/s numerator of every row).

    Data rows: dispatch reads the kept token rows and writes every slot (empty ones as zeros);
    combine reads the kept slot rows and writes every token row. Index and gate arrays are
    counted too, though they are small next to the rows.
    """
    it, D, T, K = p.dtype.itemsize, p.D, p.T, p.K
    slots, kept = p.E * p.C, p.kept
    dispatch = (kept * D + slots * D) * it + slots * INDEX_BYTES
    combine = (kept * D + T * D) * it + T * K * (2 * INDEX_BYTES + it)
    gate_grad = (T * D + kept * D) * it + T * K * (2 * INDEX_BYTES + it)
    return {"dispatch": dispatch, "combine": combine,
            "dispatch_bwd": combine - T * K * it,
            "combine_bwd": dispatch + T * K * it + gate_grad}


def dense_bytes_needed(p: Problem) -> int:
    """Peak memory of the dense formulation: the bool mask, the combine weights, a float copy of
    the mask inside the einsum and the [T, E, C] gradient of the combine weights."""
    tec = p.T * p.E * p.C
    return tec * (1 + 3 * max(p.dtype.itemsize, 4))


def available_memory() -> int:
    """MemAvailable from /proc/meminfo, in bytes (0 when unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def numpy_indexed(p: Problem) -> dict[str, Callable[[], object]]:
    """The NumPy indexed formulation (pymoe.indexed), as the reference runs it."""
    r, K = p.routing, p.K
    return {
        "dispatch": lambda: dispatch_indexed(p.x, r.slot_owner, K),
        "combine": lambda: combine_indexed(p.expert_out, r.expert_index, r.position, p.gate),
        "dispatch_bwd": lambda: combine_indexed(p.expert_out, r.expert_index, r.position),
        "combine_bwd": lambda: (dispatch_indexed(p.dy, r.slot_owner, K, p.gate),
                                gate_grad_indexed(p.dy, p.expert_out, r.expert_index, r.position)),
    }


def numpy_dense(p: Problem) -> dict[str, Callable[[], object]] | str:
    """The dense einsum formulation, or the reason it is skipped (memory)."""
    need, have = dense_bytes_needed(p), available_memory()
    if os.environ.get("PYMOE_BENCH_DENSE_MAX_GB"):
        have = min(have, int(float(os.environ["PYMOE_BENCH_DENSE_MAX_GB"]) * 1e9))
    if not have or need > 0.7 * have:
        return (f"skipped: its [T, E, C] = [{p.T}, {p.E}, {p.C}] tensors need about "
                f"{need / 1e9:.1f} GB, {have / 1e9:.1f} GB available")
    r = p.routing
    mask, cw = r.dispatch_mask, r.combine_weights.astype(p.dtype)

    def combine_bwd():
        d_out, d_cw = combine_dense_backward(p.dy, p.expert_out, cw)
        return d_out, gate_grad_from_dense(d_cw, r.expert_index, r.position)

    return {
        "dispatch": lambda: dispatch_dense(p.x, mask),
        "combine": lambda: combine_dense(p.expert_out, cw),
        "dispatch_bwd": lambda: dispatch_dense_backward(p.expert_out, mask),
        "combine_bwd": combine_bwd,
    }


def c_core(p: Problem, backend, threads: int) -> dict[str, Callable[[], object]]:
    """The C core with `threads` OpenMP threads, writing into preallocated outputs."""
    r, K = p.routing, p.K
    ein = np.empty((p.E, p.C, p.D), p.dtype)
    y = np.empty((p.T, p.D), p.dtype)

    def run(fn):
        def call():
            with backend.num_threads(threads):
                return fn()
        return call

    return {
        "dispatch": run(lambda: backend.dispatch(p.x, r.slot_owner, K, out=ein)),
        "combine": run(lambda: backend.combine(p.expert_out, r.expert_index, r.position, p.gate,
                                               out=y)),
        "dispatch_bwd": run(lambda: backend.combine(p.expert_out, r.expert_index, r.position,
                                                    out=y)),
        "combine_bwd": run(lambda: (backend.dispatch(p.dy, r.slot_owner, K, p.gate, out=ein),
                                    backend.gate_grad(p.dy, p.expert_out, r.expert_index,
                                                      r.position))),
    }
