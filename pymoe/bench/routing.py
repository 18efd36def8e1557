"""route() itself: the NumPy reference, the route before top-K moved to C, and the C route, with
a stable argsort of the same logits as the yardstick (route() does that ranking and more)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..backend import backends, get_backend
from ..backend.numpy_backend import NumpyBackend
from ..options import route_options
from ..routing import route_unchecked

BEFORE = "numpy top-k + C slots (route before C top-k)"
ARGSORT = "np.argsort, stable (yardstick)"  # ranks [T, E] and nothing else


class _NumpyTopKCSlots:
    """The route before top-K moved to C: NumPy's softmax and argsort top-K, the C slot
    assignment."""
    name = "numpy top-k + C slots"

    def __init__(self, c) -> None:
        self.softmax_lse = NumpyBackend().softmax_lse
        self.top_k = NumpyBackend().top_k
        self.assign_slots = c.assign_slots


def routing_contenders(logits: np.ndarray, k: int, capacity_factor: float
                       ) -> tuple[dict[str, Callable[[], object]], dict[str, str]]:
    """(name -> one route() call, name -> why skipped) on the same [T, E] float32 logits."""
    opts = route_options(logits.shape[1], k, capacity_factor)  # checked once, as MoELayer does

    def call(backend, threads=None):
        def run():
            if threads is None:
                return route_unchecked(logits, opts, backend=backend)
            with backend.num_threads(threads):
                return route_unchecked(logits, opts, backend=backend)
        return run

    fns = {"numpy (reference)": call(NumpyBackend()),
           ARGSORT: lambda: np.argsort(logits, axis=-1, kind="stable")}
    skipped: dict[str, str] = {}
    info = backends()["c"]
    if not info.available:
        skipped["C"] = info.detail
        return fns, skipped
    c = get_backend("c")
    fns[BEFORE] = call(_NumpyTopKCSlots(c))
    fns["C 1 thread"] = call(c, 1)
    if c.default_num_threads > 1:
        fns[f"C {c.default_num_threads} threads"] = call(c, c.default_num_threads)
    return fns, skipped
