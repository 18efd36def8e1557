"""What a host backend is (the Backend protocol) and how the registry describes one (BackendInfo).

Its own module so that the registry (backend/__init__.py) and the backends it loads (numpy_backend,
c_backend, cuda_backend) all import it, and none of them imports another.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class Backend(Protocol):
    """The operations a host backend (numpy, c) provides to MoELayer, on NumPy arrays; shapes use
    the legend in router.py. (The CUDA backend works on device arrays and has its own interface,
    pymoe.backend.cuda_backend.CudaBackend.)"""
    name: str

    def softmax_lse(self, router_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> (probs `[T, E]`, logsumexp `[T]`), the bits of router.softmax_lse."""

    def top_k(self, score: np.ndarray, k: int, bias: np.ndarray | None = None,
              probs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """-> (expert_index `<int64>[T, K]` of score + bias (topk.top_k), expert_load `<int64>[E]`,
        losses.expert_prob_sum(probs) `[E]` or None without probs)."""

    def assign_slots(self, expert_index: np.ndarray, token_order: np.ndarray | None,
                     num_experts: int, capacity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (position `<int64>[T, K]` with -1 where dropped, slot_owner `<int64>[E, C]`,
        expert_load `<int64>[E]` before dropping); token_order None means 0, 1, ..., T-1."""

    def assign_slots_ordered(self, expert_index: np.ndarray, order: np.ndarray, num_experts: int,
                             capacity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (position, slot_owner, expert_load) with the pairs of `order` (flat ids t*K + j)
        claiming slots in that order; unlisted pairs get -1 (slots.assign_slots_ordered)."""

    def keep_by_score(self, expert_index: np.ndarray, order: np.ndarray, score: np.ndarray,
                      num_experts: int, capacity: int) -> np.ndarray:
        """-> keep `<bool>[T, K]`, each expert's C best-scoring pairs of `order`
        (capacity.keep_by_score)."""

    def bias_relu(self, a: np.ndarray, bias: np.ndarray) -> None:
        """a = relu(a + bias) in place, a `[n, H]` (experts.bias_relu)."""

    def relu_backward(self, grad: np.ndarray, hidden: np.ndarray) -> None:
        """grad *= hidden > 0 in place, both `[n, H]` (experts.relu_backward)."""

    def form_forward(self, form: str, a: np.ndarray, out: np.ndarray, *args: float,
                     bias: np.ndarray | None = None) -> None:
        """out = h `[n, H]` of an expert form from a `[n, W]` (expert_forms.<form>); bias `[W]`:
        a += bias first, in place (the first layer's bias, in the same pass)."""

    def form_backward(self, form: str, dh: np.ndarray, a: np.ndarray, out: np.ndarray,
                      *args: float) -> None:
        """out = da `[n, W]` from dh `[n, H]` and a (expert_forms.<form>_backward)."""

    def dispatch(self, x: np.ndarray, slot_owner: np.ndarray, k: int,
                 weight: np.ndarray | None = None) -> np.ndarray:
        """-> expert_in `[E, C, D]` (indexed.dispatch_indexed)."""

    def combine(self, expert_out: np.ndarray, expert_index: np.ndarray, position: np.ndarray,
                weight: np.ndarray | None = None) -> np.ndarray:
        """-> y `[T, D]` (indexed.combine_indexed)."""

    def gate_grad(self, dy: np.ndarray, expert_out: np.ndarray, expert_index: np.ndarray,
                  position: np.ndarray) -> np.ndarray:
        """-> dgate `[T, K]` (indexed.gate_grad_indexed)."""

    def between_blas_calls(self) -> AbstractContextManager[None]:
        """A block whose C calls from this thread run on one thread (the C backend's; a no-op
        elsewhere): MoELayer's forward and backward, whose steps sit between BLAS calls."""


@dataclass(frozen=True)
class BackendInfo:
    """Whether a backend can be used here, and why not when it cannot."""
    name: str
    available: bool
    detail: str  # what it is when available, the reason when not

    def __str__(self) -> str:
        state = "available" if self.available else "unavailable"
        return f"{self.name:6s} {state:11s} {self.detail}"
