"""Backends: who moves the routed data (slot assignment, dispatch, combine and their backward).

Every backend computes exactly what the NumPy indexed formulation (indexed.py) computes; the tests
check each one against it. Expert matmuls always run in NumPy/BLAS.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .capacity import drop, slot_owner
from .indexed import combine_indexed, dispatch_indexed, gate_grad_indexed
from .priority import position_in_expert

BACKEND_NAMES = ("numpy", "c", "cuda")


class Backend(Protocol):
    """The operations a backend provides; shapes use the legend in router.py."""
    name: str

    def assign_slots(self, expert_index: np.ndarray, token_order: np.ndarray, num_experts: int,
                     capacity: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (position `<int64>[T, K]` with -1 where dropped, slot_owner `<int64>[E, C]`)."""

    def dispatch(self, x: np.ndarray, slot_owner: np.ndarray, k: int,
                 weight: np.ndarray | None = None) -> np.ndarray:
        """-> expert_in `[E, C, D]` (indexed.dispatch_indexed)."""

    def combine(self, expert_out: np.ndarray, expert_index: np.ndarray, position: np.ndarray,
                weight: np.ndarray | None = None) -> np.ndarray:
        """-> y `[T, D]` (indexed.combine_indexed)."""

    def gate_grad(self, dy: np.ndarray, expert_out: np.ndarray, expert_index: np.ndarray,
                  position: np.ndarray) -> np.ndarray:
        """-> dgate `[T, K]` (indexed.gate_grad_indexed)."""


class NumpyBackend:
    """The reference: the cumsum slot assignment and the NumPy indexed formulation."""
    name = "numpy"

    def assign_slots(self, expert_index: np.ndarray, token_order: np.ndarray, num_experts: int,
                     capacity: int) -> tuple[np.ndarray, np.ndarray]:
        position = position_in_expert(expert_index, num_experts, token_order)  # [T, K]
        position, _, _ = drop(position, np.zeros(position.shape), capacity)
        return position, slot_owner(expert_index, position, capacity, num_experts)

    dispatch = staticmethod(dispatch_indexed)
    combine = staticmethod(combine_indexed)
    gate_grad = staticmethod(gate_grad_indexed)


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
