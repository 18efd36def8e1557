"""04: how fast can routing go? NumPy against the C core (and the CUDA kernels on a GPU).

What it teaches:
- How to time memory-bound code honestly: a warm-up call, several repeats, the median, the
  contenders interleaved, and a bandwidth figure (bytes that must be read + written / time)
  compared with a plain copy timed in the same rotation (so machine noise moves both).
- Where the time goes: the NumPy reference's fancy indexing reaches a fraction of the copy
  bandwidth; the C core (one output row per thread, non-temporal stores) reaches about the copy
  bandwidth or more, since it skips the copy's read-for-ownership of the destination.
- The whole layer: expert matmuls dominate, so a faster data movement buys less there.

The full benchmark, with the dense formulation and PyTorch, is `python -m pymoe.bench`.

Run:  python examples/04_speed.py [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse

import numpy as np

import pymoe
from pymoe import viz
from pymoe.bench.layer import expert_flops, layer_contenders
from pymoe.bench.ops import OPS, c_core, make_problem, numpy_indexed, op_bytes
from pymoe.bench.report import Row, format_table
from pymoe.bench.timing import time_round_robin


def cuda_rows(T: int, D: int, E: int, K: int, repeats: int) -> list[Row]:
    """The same operations on the GPU, when a CUDA backend with CuPy is available."""
    from pymoe.bench.cuda import DeviceTimer, bench_problem

    be = pymoe.get_backend("cuda")
    args = argparse.Namespace(T=T, D=D, capacity_factor=1.25, dtype="float32", repeats=repeats)
    rows: list[Row] = []
    bench_problem(be, args, E, K, DeviceTimer(be.memory.xp), rows)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (for CI)")
    ap.add_argument("--out", default="pymoe-out", help="where the pictures go (default pymoe-out)")
    args = ap.parse_args(argv)
    T, D, E, K, repeats = (2048, 256, 16, 2, 3) if args.quick else (8192, 1024, 64, 2, 7)
    layer_shape = (512, 128, 256, 4, 2) if args.quick else (2048, 512, 2048, 8, 2)

    info = pymoe.backends()
    print("Backends here:")
    for b in info.values():
        print("  " + str(b))
    p = make_problem(T, D, E, K, 1.25, np.dtype(np.float32))
    src, dst = np.ones_like(p.expert_out), np.empty_like(p.expert_out)  # the copy baseline
    contenders = {"numpy indexed": numpy_indexed(p)}
    if info["c"].available:
        be = pymoe.get_backend("c")
        contenders["C 1 thread"] = c_core(p, be, 1)
        contenders[f"C {be.max_threads} threads"] = c_core(p, be, be.max_threads)
    nbytes, rows, copies = op_bytes(p), [], []
    for op in OPS:
        fns = {"np.copyto": lambda: np.copyto(dst, src)}
        fns.update({impl: ops[op] for impl, ops in contenders.items()})
        times = time_round_robin(fns, repeats)
        copy_gbps = 2 * src.nbytes / times["np.copyto"][0] / 1e9
        copies.append(copy_gbps)
        for impl, (t, _) in times.items():
            gbps = 2 * src.nbytes / t / 1e9 if impl == "np.copyto" else nbytes[op] / t / 1e9
            rows.append(Row(p.label(), op, impl, t * 1e3, gbps, gbps / copy_gbps))
    copy_gbps = float(np.median(copies))
    lt, ld, lh, le, lk = layer_shape
    fns, skipped, n_rows = layer_contenders(lt, ld, lh, le, lk, 1.25, use_torch=False, dense=False)
    sec = f"layer forward+backward: T={lt} D={ld} H={lh} E={le} K={lk} float32"
    for name, (t, _) in time_round_robin(fns, max(3, repeats // 2)).items():
        rows.append(Row(sec, "fwd+bwd", name, t * 1e3, gflops=expert_flops(n_rows, ld, lh) / t / 1e9))
    if info["cuda"].available:  # --quick: also small enough for the CPU emulation of the kernels
        rows += cuda_rows(*((256, 64, 8, 2) if args.quick else (65536, 4096, 64, 2)), repeats)
    print(f"\ncopy bandwidth (np.copyto, read + write, median over the operations): "
          f"{copy_gbps:.2f} GB/s")
    print(format_table(rows))

    def ms(op, impl):
        return next(r.ms for r in rows if r.op == op and r.impl == impl)

    speedups = {}
    for impl in contenders:
        if impl != "numpy indexed":
            speedups[impl] = {op: ms(op, "numpy indexed") / ms(op, impl) for op in OPS}
            print(f"\n{impl} vs the NumPy reference: " + ", ".join(
                f"{op} {v:.1f}x" for op, v in speedups[impl].items()))
    if not info["c"].available:
        print(f"\nC backend unavailable: {info['c'].detail}")
    if not info["cuda"].available:
        print(f"CUDA backend unavailable: {info['cuda'].detail}")
    path = f"{args.out}/04_speed.png"
    figs = {path: viz.benchmark_bars(rows, path, reference=copy_gbps)}
    return {"rows": rows, "copy_gbps": copy_gbps, "speedups": speedups, "pictures": figs}


if __name__ == "__main__":
    main()
