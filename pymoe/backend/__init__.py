"""The backend registry: which backends exist, whether each is available here, and get_backend().

A backend moves the routed data (slot assignment, dispatch, combine and their backward); every one
computes exactly what the NumPy indexed formulation (indexed.py) computes, and the tests check each
against it. Expert matmuls always run in NumPy/BLAS.
"""
from __future__ import annotations

from typing import Any

from .numpy_backend import NumpyBackend
from .protocol import Backend, BackendInfo

__all__ = ["BACKEND_NAMES", "Backend", "BackendInfo", "backends", "get_backend"]

BACKEND_NAMES = ("numpy", "c", "cuda")


def _probe(name: str) -> tuple[Any, BackendInfo]:
    """(implementation or None, info). Any: the CUDA backend works on device arrays and has its
    own interface (cuda_backend.CudaBackend), not the host Backend protocol."""
    if name == "numpy":
        return NumpyBackend(), BackendInfo("numpy", True, "NumPy reference (always built)")
    if name == "c":  # imported on demand: loading the C core sets OMP_WAIT_POLICY
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
