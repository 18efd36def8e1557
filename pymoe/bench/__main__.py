"""python -m pymoe.bench: NumPy vs C vs PyTorch for MoE routing, dispatch/combine and the layer.

Every row is a median over repeats after a warm-up, on the same data, in one run, with the
contenders interleaved; GB/s counts the bytes each operation must read plus write, and "x copy"
divides by the bandwidth of an np.copyto of an expert buffer, interleaved with that operation's
contenders (so a noisy neighbour moves the baseline and the rows together).

torch is imported before pymoe loads its C core. torch's wheel bundles libgomp.so.1, which then
is the one OpenMP runtime of the process (the C core binds to it) and keeps torch's default policy:
its workers spin after a parallel region. pymoe's OMP_WAIT_POLICY=PASSIVE (set when unset, before
the C core loads) would reach it otherwise, and HF's blocks ran slower with it (Mixtral-like
fwd+bwd 459 -> 508 ms, eager). pymoe's layers run their C steps on one thread between their BLAS
calls (CBackend.between_blas_calls), so the spinning does not cost them; route() and the
dispatch/combine rows run on the C core's threads.
`--backend cuda` benchmarks the CUDA kernels instead (on a machine with a GPU).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import numpy as np

from .._checks import cli_int, cli_positive_float, output_path
from ..backend import backends
from . import torch_peer
from .cpu import bench_layer, bench_ops, bench_routing, copy_bandwidth
from .gated import SHAPES, bench_gated, sweep_gated
from .report import Row, format_table, markdown_table, plot, write_json
from .summary import summary_lines, update_readme
from .sweep import SWEEP_T, plot_sweep, sweep_rows


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m pymoe.bench", description=__doc__.splitlines()[0])
    pos = cli_int(1)
    ap.add_argument("--T", type=pos, help="tokens (default 16384; cuda 65536)")
    ap.add_argument("--D", type=pos, help="model dim (default 1024; cuda 4096)")
    ap.add_argument("--E", type=pos, nargs="+", help="experts (default 8 64; cuda 64)")
    ap.add_argument("--K", type=pos, nargs="+", help="choices (default 1 2; cuda 2)")
    ap.add_argument("--capacity-factor", type=cli_positive_float, default=1.25)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--repeats", type=pos, help="timed calls per row (default 7; --quick 3)")
    ap.add_argument("--layer", type=pos, nargs=5, action="append",
                    metavar=("T", "D", "H", "E", "K"), help="a whole-layer problem, repeatable "
                    "(default 4096 512 2048 8 2 and 4096 512 256 64 8)")
    ap.add_argument("--no-routing", action="store_true", help="skip the route() rows")
    ap.add_argument("--no-sweep", action="store_true", help="skip the dispatch-vs-T sweep")
    ap.add_argument("--out", metavar="DIR", help="write cpu.txt, cpu.json, cpu.md, cpu.png and "
                    "sweep.png there (docs/bench for the committed run)")
    ap.add_argument("--readme", metavar="PATH", help="rewrite the benchmark summary between "
                    "the <!-- bench:summary --> markers of this file (README.md) from this run")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense einsum rows")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    ap.add_argument("--no-layer", action="store_true", help="skip the whole-layer rows")
    ap.add_argument("--no-gated", action="store_true", help="skip the gated-layer rows (Mixtral- "
                    "and DeepSeek-like, against HF transformers' block) and their T sweep")
    ap.add_argument("--gated-sweep-max", type=pos, default=16384, metavar="T",
                    help="largest T of the gated-layer sweep (default 16384; 65536 for the full "
                    "1k-64k sweep: about a minute more and ~5 GB of buffers)")
    ap.add_argument("--quick", action="store_true", help="small shapes, few repeats (smoke test)")
    ap.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    ap.add_argument("--markdown", metavar="PATH", help="also write the table as Markdown")
    ap.add_argument("--plot", metavar="PATH", help="draw the table (needs matplotlib)")
    ap.add_argument("--backend", choices=["cpu", "cuda"], default="cpu",
                    help="cpu: NumPy/C/torch (default); cuda: the CUDA kernels on a GPU")
    ap.add_argument("--block-size", type=pos, nargs="+", default=[256],
                    help="cuda: threads per block, one set of rows each (default 256)")
    args = ap.parse_args(argv)
    defaults = {  # (T, D, E, K); --quick: a smoke test in seconds
        ("cpu", False): (16384, 1024, [8, 64], [1, 2]), ("cpu", True): (2048, 256, [8], [2]),
        ("cuda", False): (65536, 4096, [64], [2]), ("cuda", True): (256, 64, [8], [2])}
    T, D, E, K = defaults[(args.backend, args.quick)]
    args.T = T if args.T is None else args.T  # an explicit value always wins (0 is refused)
    args.D = D if args.D is None else args.D
    args.E, args.K = args.E or E, args.K or K
    if max(args.K) > min(args.E):
        ap.error(f"argument --K: every K must be at most every E, got K = {args.K}, E = {args.E}")
    for spec in args.layer or ():
        if spec[4] > spec[3]:
            ap.error(f"argument --layer: K = {spec[4]} exceeds E = {spec[3]} in {spec}")
    for opt in ("json", "markdown", "plot", "readme"):
        if getattr(args, opt):
            try:
                output_path(f"--{opt}", getattr(args, opt))
            except (TypeError, ValueError) as err:
                ap.error(f"argument {err}")
    args.layer = args.layer or ([[512, 128, 256, 4, 2], [512, 128, 64, 16, 4]] if args.quick else
                                [[4096, 512, 2048, 8, 2], [4096, 512, 256, 64, 8]])
    args.route = [(64, 2), (256, 8)]  # (E, K): a common shape and DeepSeek-V3's experts
    args.sweep = ((256, 512, 1024), 64) if args.quick else (SWEEP_T, 256)  # (Ts, D)
    if args.repeats is None:  # --quick's few repeats only when none were asked for
        args.repeats = 3 if args.quick else 7
    return args


def meta_info(torch_info: str, wait_policy: str | None) -> dict:
    info = backends()
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                       f"{platform.python_version()}, numpy {np.__version__}",
            "c": info["c"].detail, "torch": torch_info,
            "openmp": {"runtimes": openmp_runtimes(),
                       "OMP_WAIT_POLICY when torch loaded it": wait_policy or "unset (spins)"}}


def openmp_runtimes() -> list[str]:
    """The OpenMP runtimes mapped into this process (Linux; [] elsewhere)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            return sorted({ln.split()[-1] for ln in f if "libgomp" in ln or "libomp" in ln})
    except OSError:
        return []


def write_outputs(args, meta: dict, rows: list[Row], summary: list[str]) -> None:
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        args.json = args.json or os.path.join(args.out, "cpu.json")
        args.markdown = args.markdown or os.path.join(args.out, "cpu.md")
        args.plot = args.plot or os.path.join(args.out, "cpu.png")
        with open(os.path.join(args.out, "cpu.txt"), "w", encoding="utf-8") as f:
            f.write(f"$ python -m pymoe.bench {' '.join(args.argv)}\n{meta}\n")
            f.write(format_table(rows) + "\n\nSummary (this run):\n" + "\n".join(summary) + "\n")
        sweep = [r for r in rows if r.T is not None and r.op == "dispatch"]
        if sweep:
            print(plot_sweep(os.path.join(args.out, "sweep.png"), sweep))
    if args.json:
        write_json(args.json, meta, rows, summary)
        print(f"JSON written to {args.json}")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(markdown_table(rows) + "\n")
        print(f"Markdown written to {args.markdown}")
    if args.plot:
        bars = [r for r in rows if r.T is None and not r.section.startswith(("route", "gated"))]
        print(plot(args.plot, bars, meta["copy_gbps"]))
    if args.readme:
        update_readme(args.readme, summary)
        print(f"summary written into {args.readme}")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.backend == "cuda":
        from .cuda import main as cuda_main
        return cuda_main(args)
    wait_policy = os.environ.get("OMP_WAIT_POLICY")
    _, torch_info = torch_peer.available()  # imports torch first: see the module docstring
    meta = meta_info(torch_info, wait_policy)
    print("pymoe benchmark:", meta["machine"])
    print("C core:", meta["c"], "| torch:", meta["torch"], "| OpenMP:", meta["openmp"])
    rows: list[Row] = []
    for E in args.E:
        for K in args.K:
            new = bench_ops(args.T, args.D, E, K, capacity_factor=args.capacity_factor,
                            dtype=args.dtype, repeats=args.repeats, dense=not args.no_dense,
                            torch=not args.no_torch)
            print(format_table(new), flush=True)
            rows += new
    meta["copy_gbps"] = copy_bandwidth(rows)  # argparse guarantees at least one problem
    print(f"\ncopy bandwidth (np.copyto, read + write; median of the per-operation baselines): "
          f"{meta['copy_gbps']:.2f} GB/s")
    if not args.no_routing:
        for E, K in args.route:
            new = bench_routing(args.T, E, K, capacity_factor=args.capacity_factor,
                                repeats=args.repeats,
                                scale_D=args.D if E in args.E and K in args.K else None)
            print(format_table(new), flush=True)
            rows += new
    if not args.no_layer:
        for shape in args.layer:
            new = bench_layer(*shape, capacity_factor=args.capacity_factor,
                              repeats=args.repeats, dense=not args.no_dense,
                              torch=not args.no_torch)
            print(format_table(new), flush=True)
            rows += new
    if not (args.no_gated or args.no_torch) and torch_peer.available()[0]:  # HF: a torch block
        for name in (["Mixtral-like"] if args.quick else list(SHAPES)):
            new = bench_gated(name, repeats=args.repeats, torch=not args.no_torch,
                              small=args.quick)
            print(format_table(new), flush=True)
            rows += new
        Ts = (256, 512) if args.quick else tuple(
            t for t in (1024, 2048, 4096, 8192, 16384, 32768, 65536) if t <= args.gated_sweep_max)
        new = sweep_gated(Ts, repeats=min(args.repeats, 3), small=args.quick)
        print(format_table(new), flush=True)
        rows += new
    if not args.no_sweep:
        Ts, D = args.sweep
        new = sweep_rows(Ts, D, 8, 2, args.capacity_factor, args.repeats)
        print(format_table(new), flush=True)
        rows += new
    summary = summary_lines(rows)
    print("\nSummary (this run):\n" + "\n".join(summary))
    write_outputs(args, meta, rows, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
