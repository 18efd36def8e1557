"""python -m pymoe.bench --backend cuda: the CUDA kernels against a device-to-device copy.

Each kernel is timed with CUDA events (median over repeats after a warm-up) and its effective
GB/s (the bytes it must read plus write, as in ops.op_bytes) is divided by the bandwidth of a
device-to-device copy of a same-sized buffer measured in the same run. The target on an H100 is
>= 0.7x copy for dispatch and combine at T=65536, D=4096, E=64, K=2 (the defaults here).
With PYMOE_CUDA_LIB pointing at the CPU emulation, the same script runs on the host (use --quick):
that checks the script, not the speed.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from .ops import OPS, make_problem, op_bytes
from .report import Row, format_table, write_json


class DeviceTimer:
    """Median seconds of fn() on the device: CUDA events with CuPy, a clock on the emulator."""

    def __init__(self, xp: Any) -> None:
        self.xp = xp
        self.cupy = xp is not np

    def __call__(self, fn: Callable[[], object], repeats: int) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            if self.cupy:
                start, stop = self.xp.cuda.Event(), self.xp.cuda.Event()
                start.record()
                fn()
                stop.record()
                stop.synchronize()
                times.append(self.xp.cuda.get_elapsed_time(start, stop) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return float(np.median(times))


def bench_problem(be: Any, args: Any, E: int, K: int, timer: DeviceTimer,
                  rows: list[Row]) -> float:
    """Rows for one problem; returns its copy bandwidth in GB/s."""
    xp = be.memory.xp
    p = make_problem(args.T, args.D, E, K, args.capacity_factor, np.dtype(args.dtype))
    r, dev = p.routing, xp.asarray
    sec = "cuda " + p.label()
    x, dy, out = dev(p.x), dev(p.dy), dev(p.expert_out)
    gate, index, position, owner = dev(p.gate), dev(r.expert_index), dev(r.position), dev(r.slot_owner)
    logits = dev(r.router_logits.astype(p.dtype))
    ein, y = xp.empty(out.shape, p.dtype), xp.empty(x.shape, p.dtype)
    src, dst = xp.ones(out.size, p.dtype), xp.empty(out.size, p.dtype)
    copy_gbps = 2 * src.nbytes / timer(lambda: xp.copyto(dst, src), args.repeats) / 1e9
    nbytes = op_bytes(p)
    it = p.dtype.itemsize
    # check=False: no status read-back (a host synchronisation) inside the timed window; the
    # warm-up call of each row runs the same call with the checks on first.
    fns = {
        "router": (lambda **c: be.router(logits, K, **c), 2 * p.T * E * it + p.T * K * (8 + it)),
        "slots": (lambda **c: be.assign_slots(index, None, E, p.C, **c), None),
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
    for op, (fn, b) in fns.items():
        fn(check=True)  # the inputs are valid: any status bit would be a bug, not a timing
        t = timer(lambda fn=fn: fn(check=False), args.repeats)
        gbps = None if b is None else b / t / 1e9
        rows.append(Row(sec, op, f"CUDA (block {be.get_block_size()})", t * 1e3, gbps,
                        None if gbps is None else gbps / copy_gbps,
                        note="device-to-device copy: %.0f GB/s" % copy_gbps if op == "dispatch"
                        else ""))
    return copy_gbps


def main(args: Any) -> int:
    from ..cuda_backend import load

    be, info = load()
    if be is None:
        print(f"CUDA backend unavailable: {info.detail}")
        return 1
    if be.memory is None:
        print("the CUDA benchmark allocates with CuPy: pip install 'pymoe-routing[cuda]'")
        return 1
    print("pymoe CUDA benchmark:", info.detail)
    timer, rows = DeviceTimer(be.memory.xp), []
    for block in args.block_size:
        be.set_block_size(block)
        for E in args.E:
            for K in args.K:
                new: list[Row] = []
                bench_problem(be, args, E, K, timer, new)
                print(format_table(new), flush=True)
                rows += new
    target = [r for r in rows if r.op in ("dispatch", "combine") and r.x_copy is not None]
    for r in target:
        print(f"  {r.op:8s} {r.x_copy:5.2f}x device copy  (H100 target >= 0.7 at T=65536 "
              f"D=4096 E=64 K=2; {'emulated: not a GPU timing' if be.emulated else 'measured'})")
    if args.json:
        write_json(args.json, {"backend": info.detail}, rows, [])
        print(f"JSON written to {args.json}")
    return 0
