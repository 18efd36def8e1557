"""Backends: who moves the routed data (slot assignment, dispatch, combine and their backward).

Every backend computes exactly what the NumPy indexed formulation (indexed.py) computes; the tests
check each one against it. Expert matmuls always run in NumPy/BLAS.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from . import _checks
from .capacity import drop, expert_load, slot_owner
from .indexed import combine_indexed, dispatch_indexed, gate_grad_indexed
from .losses import expert_prob_sum
from .priority import position_in_expert
from .topk import top_k

BACKEND_NAMES = ("numpy", "c", "cuda")


class Backend(Protocol):
    """The operations a host backend (numpy, c) provides to MoELayer, on NumPy arrays; shapes use
    the legend in router.py. (The CUDA backend works on device arrays and has its own interface,
    pymoe.cuda_backend.CudaBackend.)"""
    name: str

    def top_k(self, score: np.ndarray, k: int, bias: np.ndarray | None = None,
              probs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """-> (expert_index `<int64>[T, K]` of score + bias (topk.top_k), expert_load `<int64>[E]`,
        losses.expert_prob_sum(probs) `[E]` or None without probs)."""

    def assign_slots(self, expert_index: np.ndarray, token_order: np.ndarray | None,
                     num_experts: int, capacity: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (position `<int64>[T, K]` with -1 where dropped, slot_owner `<int64>[E, C]`);
        token_order None means 0, 1, ..., T-1 (choice priority)."""

    def dispatch(self, x: np.ndarray, slot_owner: np.ndarray, k: int,
                 weight: np.ndarray | None = None) -> np.ndarray:
        """-> expert_in `[E, C, D]` (indexed.dispatch_indexed)."""

    def combine(self, expert_out: np.ndarray, expert_index: np.ndarray, position: np.ndarray,
                weight: np.ndarray | None = None) -> np.ndarray:
        """-> y `[T, D]` (indexed.combine_indexed)."""

    def gate_grad(self, dy: np.ndarray, expert_out: np.ndarray, expert_index: np.ndarray,
                  position: np.ndarray) -> np.ndarray:
        """-> dgate `[T, K]` (indexed.gate_grad_indexed)."""


# ------------------------------------------------------------------ argument checks
# Shared by every host backend, so that NumPy and C reject the same inputs with the same messages.

def top_k_args(score: np.ndarray, k: int, bias: np.ndarray | None, probs: np.ndarray | None,
               dtypes: tuple = _checks.FLOAT_DTYPES, who: str = "NumPy"):
    score = _float_arg("score", score, (None, None), dtypes, who, finite=True)
    T, E = score.shape
    k = _checks.integer("k", k, low=1, high=max(E, 1))
    if bias is not None:
        bias = _float_arg("bias", bias, (E,), dtypes, who, finite=True).astype(score.dtype,
                                                                              copy=False)
    if probs is not None:
        probs = _float_arg("probs", probs, (T, E), dtypes, who).astype(score.dtype, copy=False)
    return score, k, bias, probs


def slot_args(expert_index: np.ndarray, token_order: np.ndarray | None, num_experts: int,
              capacity: int) -> tuple[np.ndarray, np.ndarray | None, int, int]:
    E = _checks.integer("num_experts", num_experts, low=1)
    C = _checks.integer("capacity", capacity, low=0)
    expert_index = _checks.index_array("expert_index", expert_index, shape=(None, None), high=E)
    T = expert_index.shape[0]
    if token_order is not None:
        token_order = _checks.index_array("token_order", token_order, shape=(T,), high=max(T, 1))
        if T and not np.array_equal(np.sort(token_order), np.arange(T)):
            raise ValueError(f"token_order: expected a permutation of 0..{T - 1}")
    return expert_index, token_order, E, C


def dispatch_args(x: np.ndarray, slot_owner: np.ndarray, k: int, weight: np.ndarray | None,
                  dtypes: tuple = _checks.FLOAT_DTYPES, who: str = "NumPy"):
    x = _float_arg("x", x, (None, None), dtypes, who)
    k = _checks.integer("k", k, low=1)
    slot_owner = _checks.index_array("slot_owner", slot_owner, shape=(None, None),
                                     high=x.shape[0] * k, low=-1)
    if weight is not None:
        weight = _float_arg("weight", weight, (x.shape[0], k), dtypes, who).astype(x.dtype,
                                                                                    copy=False)
    return x, slot_owner, k, weight


def pair_args(expert_out: np.ndarray, expert_index: np.ndarray, position: np.ndarray,
              dtypes: tuple = _checks.FLOAT_DTYPES, who: str = "NumPy"):
    expert_out = _float_arg("expert_out", expert_out, (None, None, None), dtypes, who)
    E, C, _ = expert_out.shape
    expert_index = _checks.index_array("expert_index", expert_index, shape=(None, None), high=E)
    position = _checks.index_array("position", position, shape=expert_index.shape, high=C, low=-1)
    return expert_out, expert_index, position


def _float_arg(name: str, a: np.ndarray, shape: tuple, dtypes: tuple,
               who: str = "NumPy", finite: bool = False) -> np.ndarray:
    a = _checks.float_array(name, a, ndim=len(shape), shape=shape, finite=finite)
    if a.dtype.type not in dtypes:
        names = " or ".join(np.dtype(d).name for d in dtypes)
        hint = " (use backend='numpy' for float16)" if np.float16 not in dtypes else ""
        raise TypeError(f"{name}: the {who} backend takes {names}, got {a.dtype}{hint}")
    return a


class NumpyBackend:
    """The reference: the cumsum slot assignment and the NumPy indexed formulation."""
    name = "numpy"

    def top_k(self, score: np.ndarray, k: int, bias: np.ndarray | None = None,
              probs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        score, k, bias, probs = top_k_args(score, k, bias, probs)
        expert_index = top_k(score if bias is None else score + bias, k)  # [T, K]
        return (expert_index, expert_load(expert_index, score.shape[1]),
                None if probs is None else expert_prob_sum(probs))

    def assign_slots(self, expert_index: np.ndarray, token_order: np.ndarray | None,
                     num_experts: int, capacity: int) -> tuple[np.ndarray, np.ndarray]:
        expert_index, token_order, E, C = slot_args(expert_index, token_order, num_experts,
                                                    capacity)
        if token_order is None:
            token_order = np.arange(expert_index.shape[0], dtype=np.int64)
        position = position_in_expert(expert_index, E, token_order)  # [T, K]
        position, _, _ = drop(position, np.zeros(position.shape), C)
        return position, slot_owner(expert_index, position, C, E)

    def dispatch(self, x: np.ndarray, slot_owner: np.ndarray, k: int,
                 weight: np.ndarray | None = None) -> np.ndarray:
        return dispatch_indexed(*dispatch_args(x, slot_owner, k, weight))

    def combine(self, expert_out: np.ndarray, expert_index: np.ndarray, position: np.ndarray,
                weight: np.ndarray | None = None) -> np.ndarray:
        expert_out, expert_index, position = pair_args(expert_out, expert_index, position)
        if weight is not None:
            weight = _float_arg("weight", weight, position.shape, _checks.FLOAT_DTYPES)
        return combine_indexed(expert_out, expert_index, position, weight)

    def gate_grad(self, dy: np.ndarray, expert_out: np.ndarray, expert_index: np.ndarray,
                  position: np.ndarray) -> np.ndarray:
        expert_out, expert_index, position = pair_args(expert_out, expert_index, position)
        dy = _float_arg("dy", dy, (position.shape[0], expert_out.shape[2]), _checks.FLOAT_DTYPES)
        return gate_grad_indexed(dy, expert_out, expert_index, position)


@dataclass(frozen=True)
class BackendInfo:
    """Whether a backend can be used here, and why not when it cannot."""
    name: str
    available: bool
    detail: str  # what it is when available, the reason when not

    def __str__(self) -> str:
        state = "available" if self.available else "unavailable"
        return f"{self.name:6s} {state:11s} {self.detail}"


def _probe(name: str) -> tuple[Backend | None, BackendInfo]:
    if name == "numpy":
        return NumpyBackend(), BackendInfo("numpy", True, "NumPy reference (always built)")
    if name == "c":
        from . import c_backend
        return c_backend.load()
    from . import cuda_backend
    return cuda_backend.load()


def backends() -> dict[str, BackendInfo]:
    """Every backend with whether it is available and, when it is not, why."""
    return {name: _probe(name)[1] for name in BACKEND_NAMES}


def get_backend(name: str) -> Backend:
    """The backend called `name` ("numpy", "c", "cuda", or "auto": C when built, else NumPy).

    Raises:
        RuntimeError naming the reason when the asked-for backend is not available.
    """
    if name == "auto":
        impl, _ = _probe("c")
        return impl if impl is not None else NumpyBackend()
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend: expected one of 'auto', {', '.join(map(repr, BACKEND_NAMES))},"
                         f" got {name!r}")
    impl, info = _probe(name)
    if impl is None:
        raise RuntimeError(f"backend {name!r} is not available: {info.detail}")
    return impl
