"""Timing helper: warm-up, interleaved repeats, median."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np


def time_round_robin(fns: dict[str, Callable[[], object]], repeats: int,
                     slow_s: float = 2.0) -> dict[str, tuple[float, int]]:
    """(median seconds per call, timed calls) of each function, after one warm-up call each.

    The repeats are interleaved (a, b, c, a, b, c, ...) so that a noisy neighbour slows every
    contender alike instead of whichever happened to run at the time. A contender whose warm-up
    took longer than slow_s (the dense einsums: seconds of BLAS and gigabytes of temporaries) is
    left out of the rotation, where it would disturb the others' caches and memory, and timed
    once on its own afterwards.
    """
    warm: dict[str, float] = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()  # warm-up: thread pools start, pages fault in, caches fill
        warm[name] = time.perf_counter() - t0
    fast = [name for name in fns if warm[name] <= slow_s]
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name in fast:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    for name in fns:
        if name not in fast:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: (float(np.median(t)), len(t)) for name, t in times.items()}
