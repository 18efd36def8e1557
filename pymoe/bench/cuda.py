"""python -m pymoe.bench --backend cuda: the CUDA kernels against a device-to-device copy.

Each kernel is timed with CUDA events around a batch of calls queued behind a spin kernel, so
the times are device times without Python's launch overhead (median over repeats after a
warm-up), and its effective
GB/s (the bytes it must read plus write, as in ops.op_bytes) is divided by the bandwidth of a
device-to-device copy of a same-sized buffer measured in the same run. With PYMOE_CUDA_LIB
pointing at the CPU emulation, the same script runs on the host (use --quick): that checks the
script, not the speed.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .ops import OPS, make_problem, op_bytes
from .report import Row, format_table, write_json

# A kernel that holds the stream for a given number of clock cycles: while it runs, Python queues
# the start event, the timed calls and the stop event, so the events measure device time only.
SPIN_SOURCE = r"""
extern "C" __global__ void pymoe_bench_spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) {}
}
"""


class _HostClock:
    """The emulator's clock: host seconds for the batch (the emulator runs on the host)."""

    def time_batch(self, fn: Callable[[], object], n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return time.perf_counter() - t0


class _EventClock:
    """CUDA events around a batch queued behind a spin kernel (CuPy)."""

    def __init__(self, cupy: Any) -> None:
        self.cp = cupy
        self.spin = cupy.RawKernel(SPIN_SOURCE, "pymoe_bench_spin")
        rate_khz = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["clockRate"]
        self.cycles_per_s = rate_khz * 1e3
        self.hold = 2e-3  # seconds the spin keeps the device busy; doubled when too short

    def time_batch(self, fn: Callable[[], object], n: int) -> float:
        cp = self.cp
        while True:
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            t0 = time.perf_counter()
            self.spin((1,), (1,), (np.int64(self.hold * self.cycles_per_s),))
            start.record()
            for _ in range(n):
                fn()
            stop.record()
            queued = time.perf_counter() - t0
            stop.synchronize()
            if queue_was_ahead(queued, self.hold):
                return cp.cuda.get_elapsed_time(start, stop) / 1e3
            self.hold *= 2  # Python was slower than the spin: the events saw launch gaps


def queue_was_ahead(queued_s: float, hold_s: float) -> bool:
    """Did the host finish queueing the batch while the spin kernel still held the device? Then
    the device ran the batch back to back, and the events timed the device alone."""
    return queued_s < 0.8 * hold_s


def batch_size(one_call_s: float, target_s: float = 1e-3, most: int = 1000) -> int:
    """Calls per timed batch: enough for ~target_s of device time (event resolution ~0.5 us)."""
    if one_call_s <= 0:
        return most
    return int(min(most, max(1, round(target_s / one_call_s))))


class DeviceTimer:
    """Median device seconds per call of fn(): CUDA events around batches of calls queued behind a
    spin kernel (so Python's launch overhead is not timed), with CuPy; the host clock on the
    emulator (which checks the code path, not the speed)."""

    def __init__(self, xp: Any, clock: Any = None) -> None:
        self.xp = xp
        self.clock = clock or (_HostClock() if xp is np else _EventClock(xp))

    def __call__(self, fn: Callable[[], object], repeats: int) -> float:
        fn()  # warm-up
        n = batch_size(self.clock.time_batch(fn, 1))
        times = [self.clock.time_batch(fn, n) / n for _ in range(repeats)]
        return float(np.median(times))


def bench_ops(be: Any, T: int, D: int, E: int, K: int, *, capacity_factor: float = 1.25,
              dtype: str = "float32", repeats: int = 7) -> list[Row]:
    """Rows for softmax_top_k, top_k, slot assignment, dispatch, combine and their backward on one
    problem, with backend `be` (a CudaBackend whose memory allocates: CuPy, or the emulator's host memory)
    at its current block size; the dispatch row's note carries the same run's copy bandwidth."""
    xp = be.memory.xp
    timer = DeviceTimer(xp)
    p = make_problem(T, D, E, K, capacity_factor, np.dtype(dtype))
    r, dev = p.routing, xp.asarray
    sec = "cuda " + p.label()
    x, dy, out = dev(p.x), dev(p.dy), dev(p.expert_out)
    gate, index, position, owner = dev(p.gate), dev(r.expert_index), dev(r.position), dev(r.slot_owner)
    logits = dev(r.router_logits.astype(p.dtype))
    ein, y = xp.empty(out.shape, p.dtype), xp.empty(x.shape, p.dtype)
    src, dst = xp.ones(out.size, p.dtype), xp.empty(out.size, p.dtype)
    copy_gbps = 2 * src.nbytes / timer(lambda: xp.copyto(dst, src), repeats) / 1e9  # same run
    nbytes = op_bytes(p)
    it = p.dtype.itemsize
    # check=False: no status read-back (a host synchronisation) inside the timed window; the
    # warm-up call of each row runs the same call with the checks on first. Bytes: what each
    # kernel must read and write (the slot counting sort reads the indices twice).
    fns = {
        "softmax_top_k": (lambda **c: be.softmax_top_k(logits, K, **c),
                          2 * p.T * E * it + p.T * K * (8 + it)),
        "top_k": (lambda **c: be.top_k(logits, K, **c), p.T * E * it + p.T * K * 8 + E * 8),
        "slots": (lambda **c: be.assign_slots(index, None, E, p.C, **c),
                  p.T * K * 8 * 3 + E * p.C * 8 + E * 8),
        "dispatch": (lambda **c: be.dispatch(x, owner, K, out=ein, **c), nbytes["dispatch"]),
        "combine": (lambda **c: be.combine(out, index, position, gate, out=y, **c),
                    nbytes["combine"]),
        "dispatch_bwd": (lambda **c: be.combine(out, index, position, out=y, **c),
                         nbytes["dispatch_bwd"]),
        "combine_bwd": (lambda **c: (be.dispatch(dy, owner, K, gate, out=ein, **c),
                                     be.gate_grad(dy, out, index, position, **c)),
                        nbytes["combine_bwd"]),
    }
    assert set(OPS) <= set(fns)
    rows = []
    for op, (fn, b) in fns.items():
        fn(check=True)  # the inputs are valid: any status bit would be a bug, not a timing
        t = timer(lambda fn=fn: fn(check=False), repeats)
        gbps = None if b is None else b / t / 1e9
        rows.append(Row(sec, op, f"CUDA (block {be.get_block_size()})", t * 1e3, gbps,
                        None if gbps is None else gbps / copy_gbps,
                        note=f"device-to-device copy: {copy_gbps:.0f} GB/s" if op == "dispatch"
                        else ""))
    return rows


def main(args: Any) -> int:
    from ..backend.cuda_backend import load

    be, info = load()
    if be is None:
        print(f"CUDA backend unavailable: {info.detail}")
        return 1
    if be.memory is None:
        print("the CUDA benchmark allocates with CuPy: pip install 'pymoe-routing[cuda]'")
        return 1
    bad = [b for b in args.block_size if b < 32 or b > 1024 or b & (b - 1)]
    if bad:
        print(f"--block-size: expected powers of two in [32, 1024], got {bad}")
        return 2
    print("pymoe CUDA benchmark:", info.detail)
    if be.emulated:
        print("emulated: these times check the script, they are not GPU timings")
    rows: list[Row] = []
    for block in args.block_size:
        with be.block_size(block):
            for E in args.E:
                for K in args.K:
                    new = bench_ops(be, args.T, args.D, E, K,
                                    capacity_factor=args.capacity_factor, dtype=args.dtype,
                                    repeats=args.repeats)
                    print(format_table(new), flush=True)
                    rows += new
    if args.json:
        write_json(args.json, {"backend": info.detail}, rows)
        print(f"JSON written to {args.json}")
    return 0
