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

import pymoe
from pymoe import viz
from pymoe.bench import cuda
from pymoe.bench.cpu import bench_layer, bench_ops, copy_bandwidth
from pymoe.bench.ops import OPS
from pymoe.bench.report import format_table


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
    rows = bench_ops(T, D, E, K, repeats=repeats, dense=False, torch=False)
    copy_gbps = copy_bandwidth(rows)
    rows += bench_layer(*layer_shape, repeats=max(3, repeats // 2), dense=False, torch=False)
    if info["cuda"].available:  # --quick: also small enough for the CPU emulation of the kernels
        cuda_shape = (256, 64, 8, 2) if args.quick else (65536, 4096, 64, 2)
        rows += cuda.bench_ops(pymoe.get_backend("cuda"), *cuda_shape, repeats=repeats)
    print(f"\ncopy bandwidth (np.copyto, read + write, median over the operations): "
          f"{copy_gbps:.2f} GB/s")
    print(format_table(rows))

    def ms(op, impl):
        return next(r.ms for r in rows if r.op == op and r.impl == impl)

    speedups = {}
    for impl in dict.fromkeys(r.impl for r in rows if r.impl.startswith("C ")):
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
