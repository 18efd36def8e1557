"""Expert-parallel step over MPI: time split and all-to-all GB/s, next to a bare MPI Alltoallv.

    python -m pymoe.bench.expert_parallel --sizes 1 2 4     # launches mpiexec -n P for each P
    mpiexec -n 4 python -m pymoe.bench.expert_parallel      # one P, run by you

For each exchange mode ("exact", "fixed") a forward + backward step runs `--repeats` times after a
warm-up, with a barrier on either side of each step. Reported per P and mode: the median step time,
its split (routing, exchange, experts, combine; mean over ranks; the exchange is packing rows into
messages and out of them plus the MPI calls, which include the wait for the slowest rank: "in
MPI"), the row bytes of the four all-to-alls (every rank's messages, those to itself included,
since MPI copies them too), their GB/s over the time inside MPI, and the ceiling: MPI Alltoallv
alone moving the same per-destination byte counts (four calls, timed the same way, interleaved
with the steps so a noisy neighbour slows both).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

# one BLAS thread per rank: P ranks share the cores (set before NumPy loads its BLAS)
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from .. import expert_parallel as epm  # noqa: E402
from ..layer import MoELayer  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m pymoe.bench.expert_parallel",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", help="launch mpiexec -n P for each P "
                    "(from a plain run); without it, measure the current MPI world")
    ap.add_argument("--shape", type=int, nargs=5, default=[1024, 256, 512, 16, 2],
                    metavar=("T_LOCAL", "D", "H", "E", "K"),
                    help="tokens per rank, model dim, expert hidden dim, experts, choices "
                         "(default 1024 256 512 16 2)")
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--repeats", type=int, default=7, help="timed steps per mode (default 7)")
    ap.add_argument("--quick", action="store_true", help="small shape, 2 repeats (smoke test)")
    ap.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    ap.add_argument("--markdown", metavar="PATH", help="write the rows as a Markdown table")
    args = ap.parse_args(argv)
    if args.quick:
        args.shape, args.repeats = [128, 32, 64, 8, 2], 2
    return args


def measure(args: argparse.Namespace) -> list[dict]:
    """Rows of the current MPI world (every rank returns them; rank 0's are the ones shown)."""
    MPI = epm.mpi()
    comm = MPI.COMM_WORLD
    P, rank = comm.Get_size(), comm.Get_rank()
    T, D, H, E, K = args.shape
    layer = MoELayer(D, H, E, K, args.capacity_factor, dtype=np.float32, seed=0)
    rng = np.random.default_rng(rank)
    x = rng.normal(size=(T, D)).astype(np.float32)
    dy = rng.normal(size=(T, D)).astype(np.float32)
    rows = []
    for mode in epm.EXCHANGES:
        ep = epm.ExpertParallelMoE(layer, comm, exchange=mode)
        ep.forward(x)
        ep.backward(dy)  # warm-up; also gives the message sizes for the bare Alltoallv
        st = ep.stats
        sends = [st.bytes[d] for d in epm.DIRECTIONS]
        counts = comm.allgather([s.tolist() for s in sends])  # [rank][exchange][dest]
        recvs = [np.array([counts[src][i][rank] for src in range(P)]) for i in range(4)]
        bufs = [(np.ones(int(s.sum()), np.uint8), np.empty(int(r.sum()), np.uint8))
                for s, r in zip(sends, recvs)]

        def bare(bufs=bufs, sends=sends, recvs=recvs) -> None:
            for (sb, rb), s, r in zip(bufs, sends, recvs):
                comm.Alltoallv([sb, (s, np.cumsum(s) - s), MPI.BYTE],
                               [rb, (r, np.cumsum(r) - r), MPI.BYTE])

        bare()
        step_s, bare_s, split = [], [], []
        for _ in range(args.repeats):
            comm.Barrier()
            t0 = time.perf_counter()
            ep.forward(x)
            ep.backward(dy)
            comm.Barrier()
            step_s.append(time.perf_counter() - t0)
            split.append([ep.stats.times.get(k, 0.0) for k in (*epm.TIME_KEYS, "mpi")])
            comm.Barrier()
            t0 = time.perf_counter()
            bare()
            comm.Barrier()
            bare_s.append(time.perf_counter() - t0)
        split_all = comm.allgather(np.median(np.array(split), axis=0))  # [P][4]
        nbytes = sum(comm.allgather(sum(int(s.sum()) for s in sends)))
        padding = sum(comm.allgather(st.total_padding()))
        ms = {k: 1e3 * float(np.mean([s[i] for s in split_all]))
              for i, k in enumerate((*epm.TIME_KEYS, "mpi"))}
        step_ms, bare_ms = 1e3 * float(np.median(step_s)), 1e3 * float(np.median(bare_s))
        rows.append({
            "P": P, "mode": mode, "shape": f"T_local={T} D={D} H={H} E={E} K={K} "
            f"capacity_factor={args.capacity_factor} float32", "step_ms": step_ms,
            **{f"{k}_ms": v for k, v in ms.items()},
            "a2a_bytes": nbytes, "padding_bytes": int(padding),
            "a2a_gbps": nbytes / (ms["mpi"] * 1e-3) / 1e9 if ms["mpi"] else None,
            "alltoallv_alone_ms": bare_ms, "alltoallv_alone_gbps": nbytes / (bare_ms * 1e-3) / 1e9,
            "repeats": args.repeats,
        })
    return rows


def format_rows(rows: list[dict]) -> str:
    head = (f"{'P':>2s} {'mode':5s} {'step ms':>8s} {'routing':>8s} {'exchange':>8s} {'(in MPI)':>8s} "
            f"{'experts':>8s} {'combine':>8s} {'a2a MB':>7s} {'pad %':>6s} {'a2a GB/s':>8s} "
            f"{'Alltoallv alone':>15s} {'GB/s':>6s}")
    lines = [rows[0]["shape"] if rows else "", head]
    for r in rows:
        gb = f"{r['a2a_gbps']:8.2f}" if r["a2a_gbps"] is not None else f"{'-':>8s}"
        lines.append(
            f"{r['P']:2d} {r['mode']:5s} {r['step_ms']:8.2f} {r['routing_ms']:8.2f} "
            f"{r['exchange_ms']:8.2f} {r['mpi_ms']:8.2f} {r['experts_ms']:8.2f} {r['combine_ms']:8.2f} "
            f"{r['a2a_bytes'] / 1e6:7.2f} {100 * r['padding_bytes'] / max(r['a2a_bytes'], 1):6.1f} "
            f"{gb} {r['alltoallv_alone_ms']:12.2f} ms {r['alltoallv_alone_gbps']:6.2f}")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    out = ["| P | exchange | step ms | routing ms | exchange ms (in MPI) | experts ms | combine ms | "
           "all-to-all MB/step | padding | all-to-all GB/s | Alltoallv alone, same bytes: ms | "
           "GB/s |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        gb = f"{r['a2a_gbps']:.2f}" if r["a2a_gbps"] is not None else "-"
        out.append(f"| {r['P']} | {r['mode']} | {r['step_ms']:.2f} | {r['routing_ms']:.2f} | "
                   f"{r['exchange_ms']:.2f} ({r['mpi_ms']:.2f}) | {r['experts_ms']:.2f} | "
                   f"{r['combine_ms']:.2f} | "
                   f"{r['a2a_bytes'] / 1e6:.2f} | "
                   f"{100 * r['padding_bytes'] / max(r['a2a_bytes'], 1):.1f}% | {gb} | "
                   f"{r['alltoallv_alone_ms']:.2f} | {r['alltoallv_alone_gbps']:.2f} |")
    return "\n".join(out)


def launch(args: argparse.Namespace, argv: list[str]) -> list[dict]:
    """mpiexec -n P of this module for each P in --sizes; their rows, in order."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = here if os.path.exists(here) else "mpiexec"
    rest, skip = [], False
    for a in argv:  # drop --sizes and the output options; the children write JSON only
        if skip and not a.startswith("--"):
            continue
        skip = a in ("--sizes", "--json", "--markdown")
        if not skip:
            rest.append(a)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for P in args.sizes:
            path = os.path.join(tmp, f"p{P}.json")
            cmd = [mpiexec, "-n", str(P), sys.executable, "-m", "pymoe.bench.expert_parallel",
                   *rest, "--json", path]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            with open(path, encoding="utf-8") as f:
                rows += json.load(f)["rows"]
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.sizes:
        rows, rank = launch(args, argv), 0
    else:
        rows, rank = measure(args), epm.mpi().COMM_WORLD.Get_rank()
    if rank:
        return rows
    print(format_rows(rows))
    meta = {"python": platform.python_version(), "numpy": np.__version__,
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "note": "P ranks on a shared machine; exchange includes waiting for the slowest rank"}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(markdown(rows) + "\n")
    return rows


if __name__ == "__main__":
    main()
