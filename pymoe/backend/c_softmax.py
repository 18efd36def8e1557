"""The softmax of route() over row blocks on several threads, for the C backend.

route(backend="c") must give the same bits as the NumPy reference, and the probabilities' bits
are set by NumPy's exp (C's expf rounds differently), so the fast route keeps NumPy's softmax and
splits it instead: each thread runs router.softmax_lse on its own rows, a cache-sized block at a
time. NumPy releases the GIL inside ufuncs and reductions, and each row depends on its own logits
only, so the result is the same bits for any thread count and any block size.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import _checks
from ..router import softmax_lse

BLOCK_ELEMENTS = 1 << 16  # per block (rows: this / E): about 256 KiB of float32, so it stays in L2
MIN_ROWS_PER_THREAD = 512  # below this a thread costs more than it saves

_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, pool)


def _executor(workers: int) -> ThreadPoolExecutor:
    """A pool of at least `workers` threads (idle ones cost nothing), made again only when more
    are needed or after a fork (the child has none of the parent's threads)."""
    global _pool
    if _pool is None or _pool[0] != os.getpid() or _pool[1] < workers:
        _pool = (os.getpid(), workers, ThreadPoolExecutor(workers, "pymoe-softmax"))
    return _pool[2]


def _rows(router_logits: np.ndarray, probs: np.ndarray, lse: np.ndarray, lo: int, hi: int) -> None:
    step = max(1, BLOCK_ELEMENTS // max(router_logits.shape[1], 1))
    for a in range(lo, hi, step):
        b = min(a + step, hi)
        _, lse[a:b] = softmax_lse(router_logits[a:b], out=probs[a:b])


def softmax_lse_threads(router_logits: np.ndarray, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """router.softmax_lse(router_logits) `([T, E], [T])`, the same bits, on up to `threads`
    threads (the calling one included)."""
    router_logits = np.ascontiguousarray(_checks.float_arg("router_logits", router_logits,
                                                           (None, None)))
    threads = _checks.integer("threads", threads, low=1)
    T = router_logits.shape[0]
    n = max(1, min(threads, T // MIN_ROWS_PER_THREAD))
    probs = np.empty_like(router_logits)  # [T, E]
    lse = np.empty(T, router_logits.dtype)  # [T]
    bounds = [T * i // n for i in range(n + 1)]
    others = [_executor(n - 1).submit(_rows, router_logits, probs, lse, bounds[i], bounds[i + 1])
              for i in range(1, n)] if n > 1 else []
    _rows(router_logits, probs, lse, bounds[0], bounds[1])
    for f in others:
        f.result()
    return probs, lse
