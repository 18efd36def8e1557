"""06: experts on several processes. Expert parallelism over MPI and what its all-to-all costs.

What it teaches:
- With expert parallelism each of P ranks holds E/P experts and routes its own T_local tokens
  (with its own capacity: the GShard group). Every kept (token, choice) row whose expert lives on
  another rank crosses the network twice in the forward pass (to the expert and back) and twice
  in the backward pass: four all-to-all exchanges per step.
- Who sends how many rows to whom depends on the router: a skewed router sends most rows to the
  ranks that hold the popular experts.
- Capacity buys static message sizes. The fixed exchange (GShard, DeepSpeed, Tutel) sends every
  expert's C slots, padding included, so its bytes grow linearly with the capacity factor; the
  exact exchange (Megatron-Core's all-to-all dispatcher) sends only the kept rows, whose number
  saturates at K * T_local once nothing is dropped. Same results, different bytes.
- Where a step's time goes: routing, the exchanges (waiting for the slowest rank included),
  the experts' matmuls and the local gather/scatter.
- --eplb: redundant experts. A skewed router overloads the ranks of the popular experts;
  DeepSeek's load balancer (pymoe.eplb) places copies of the hot experts on other ranks, the
  rows of a copied expert are split among its copies, and the load per rank evens out, with
  the same outputs.

Run:  mpiexec -n 4 python examples/06_expert_parallel.py [--quick] [--out DIR] [--eplb]
      python examples/06_expert_parallel.py              (one rank: P = 1)
Needs `pip install 'pymoe-routing[mpi]'` (mpi4py and MPICH, which brings mpiexec).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

# P ranks share the cores: one BLAS thread per rank (set before NumPy loads its BLAS), as MPI jobs
# usually run; otherwise P x cores threads fight over the cores and every timing is noise.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

import pymoe  # noqa: E402
from pymoe import expert_parallel as ep_mod  # noqa: E402
from pymoe import viz  # noqa: E402


def make_layer(D: int, H: int, E: int, K: int, cf: float | None, skew: float) -> pymoe.MoELayer:
    """The same layer on every rank (same seed); the router bias makes expert e's logit
    skew * e lower, so the low-numbered experts (on the low ranks) are the popular ones."""
    layer = pymoe.MoELayer(D, H, E, K, cf, dtype=np.float32, seed=0)
    layer.params["b_router"][:] = -skew * np.arange(E)
    return layer


def one_step(layer: pymoe.MoELayer, comm, exchange: str, x: np.ndarray, dy: np.ndarray,
             repeats: int = 1) -> tuple[dict[str, np.ndarray], ep_mod.ExpertParallelMoE]:
    """Forward + backward on every rank; gathered P x P statistics (times: the median step)."""
    ep = ep_mod.ExpertParallelMoE(layer, comm, exchange=exchange)
    times = []
    for _ in range(repeats):
        ep.forward(x)
        ep.backward(dy)
        st = ep.gather_stats()
        times.append(st["times"])
    st["times"] = np.median(np.stack(times), axis=0)  # [P, 4]
    return st, ep


def eplb_section(comm, quick: bool, out: str, say) -> dict:
    """Load per rank before and after EPLB (pymoe.eplb + ExpertParallelMoE(placement=...)).

    Dropless (no capacity), so the load of a rank is every row routed to its experts: what its
    expert matmuls do. One redundant slot per rank: N = E + P physical experts."""
    from pymoe import eplb

    P, rank = comm.Get_size(), comm.Get_rank()
    T_local, D, H, E, K = (128, 32, 64, 16, 2) if quick else (1024, 256, 512, 16, 2)
    skew = 0.1
    layer = make_layer(D, H, E, K, None, skew)  # capacity None: dropless
    rng = np.random.default_rng(100 + rank)
    x = rng.normal(size=(T_local, D)).astype(np.float32)
    dy = rng.normal(size=(T_local, D)).astype(np.float32)
    plain = ep_mod.ExpertParallelMoE(layer, comm)
    y0, dx0 = plain.forward(x), plain.backward(dy)
    before = plain.gather_stats()["rows"][0].sum(axis=0)  # [P] rows each rank's experts get
    load = comm.allreduce(plain.routing.expert_load_kept)  # [E] rows per expert, all ranks
    N = E + P
    phy2log, _, logcnt = eplb.rebalance_experts(load[None], N, 1, 1, P)  # global policy
    predicted = eplb.gpu_loads(load, phy2log, P)[0]  # [P] EPLB's own estimate (even split)
    rep = ep_mod.ExpertParallelMoE(layer, comm, placement=phy2log[0])
    y1, dx1 = rep.forward(x), rep.backward(dy)
    after = rep.gather_stats()["rows"][0].sum(axis=0)  # [P]
    same = comm.allreduce(int(np.array_equal(y0, y1) and np.array_equal(dx0, dx1)))  # ranks
    dw = max(comm.allgather(max(float(np.abs(rep.grads[n] - _plain_grad(plain, rep, n, comm)).max())
                                for n in ("w1", "b1", "w2", "b2"))))
    say(f"\nEPLB (--eplb): P={P} ranks, E={E} experts, K={K}, T_local={T_local}, dropless, "
        f"router bias -{skew} * e; N = E + P = {N} slots ({N // P} per rank)")
    say(f"  rows per expert (all ranks): {load.tolist()}")
    say(f"  replicas per expert: {logcnt[0].tolist()}")
    say(f"  placement phy2log (slots of rank r: [{N // P}r, {N // P}(r+1))): {phy2log[0].tolist()}")
    say(f"  {'rank':>6s} {'before':>8s} {'after':>8s} {'EPLB estimate':>14s}")
    for r in range(P):
        say(f"  {r:6d} {before[r]:8d} {after[r]:8d} {predicted[r]:14.1f}")
    ratio = [float(v.max() / v.mean()) for v in (before, after)]
    say(f"  max / mean: {ratio[0]:.3f} before, {ratio[1]:.3f} after; y and dx bit-identical on "
        f"{same} of {P} ranks; expert gradients: largest difference {dw:.2e} (the replicas' "
        "sum adds in another order)")
    res = {"P": P, "E": E, "K": K, "T_local": T_local, "N": N, "expert_rows": load.tolist(),
           "phy2log": phy2log[0].tolist(), "logcnt": logcnt[0].tolist(),
           "rows_before": before.tolist(), "rows_after": after.tolist(),
           "eplb_estimate": predicted.tolist(), "max_over_mean": ratio,
           "ranks_bit_identical": same, "max_expert_grad_diff": dw, "pictures": {}}
    if rank == 0:
        path = f"{out}/06_eplb_load_per_rank.png"
        res["pictures"][path] = viz.rank_load_bars(
            {"before EPLB": before.tolist(), f"after EPLB (+{P} replicas)": after.tolist()},
            path, title=f"rows into each rank's experts, skewed router (measured)\n"
                        f"P={P}, E={E}, K={K}, T_local={T_local}, dropless; dashed: the mean")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "06_eplb.json"), "w") as f:
            json.dump({k: v for k, v in res.items() if k != "pictures"}, f, indent=1)
    return res


def _plain_grad(plain, rep, name: str, comm) -> np.ndarray:
    """The layer-without-replicas gradient of parameter `name` for rep's slots `[N/P, ...]`."""
    every = np.concatenate(comm.allgather(plain.grads[name]))  # [E, ...] in expert order
    return every[list(rep.experts)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (for CI)")
    ap.add_argument("--out", default="pymoe-out", help="where the pictures go (default pymoe-out)")
    ap.add_argument("--eplb", action="store_true",
                    help="only the load per rank before and after EPLB's redundant experts")
    args = ap.parse_args(argv)
    MPI = ep_mod.mpi()
    comm = MPI.COMM_WORLD
    P, rank = comm.Get_size(), comm.Get_rank()
    if args.eplb:
        return eplb_section(comm, args.quick, args.out, print if rank == 0 else lambda *a: None)
    T_local, D, H, E, K = (128, 64, 128, 16, 2) if args.quick else (1024, 256, 512, 16, 2)
    repeats = 3 if args.quick else 7
    cf, skew, item = 1.25, 0.05, np.dtype(np.float32).itemsize
    rng = np.random.default_rng(rank)  # every rank has its own tokens
    x = rng.normal(size=(T_local, D)).astype(np.float32)
    dy = rng.normal(size=(T_local, D)).astype(np.float32)
    say = print if rank == 0 else (lambda *a, **k: None)

    say(f"Expert parallelism on P={P} rank(s): E={E} experts ({E // P} per rank), K={K}, "
        f"T_local={T_local} tokens per rank, D={D}, float32, capacity factor {cf}, "
        f"router skewed towards the low experts")
    layer = make_layer(D, H, E, K, cf, skew)
    stats, ep = {}, None
    for mode in ep_mod.EXCHANGES:
        stats[mode], ep = one_step(layer, comm, mode, x, dy, repeats)
    C = ep.routing.capacity
    drops = comm.gather(ep.routing.dropped_fraction)
    rows = stats["exact"]["rows"][0]  # [P, P] dispatch; the other exchanges move the same rows
    say(f"\nC = {C} slots per expert and rank; dropped pairs per rank: "
        + ", ".join(f"{d:.1%}" for d in drops or []))
    say("\nRows each rank sends to each rank in the dispatch (row = sender; the diagonal stays "
        "home;\nthe combine sends them back, the backward pass repeats both):")
    say("        " + " ".join(f"{'to ' + str(q):>7s}" for q in range(P)))
    for r in range(P):
        say(f"rank {r} " + " ".join(f"{v:7d}" for v in rows[r]))

    say("\nBytes per step (4 exchanges, all ranks together):")
    summary = {}
    for mode in ep_mod.EXCHANGES:
        st = stats[mode]
        total, pad = int(st["bytes"].sum()), int(st["padding_bytes"].sum())
        away = int(st["bytes"][:, ~np.eye(P, dtype=bool)].sum())
        summary[mode] = {"bytes": total, "padding_bytes": pad, "to_other_ranks": away,
                         "control_bytes": int(st["control_bytes"].sum()),
                         "times_ms": (1e3 * st["times"].mean(axis=0)).tolist()}
        say(f"  {mode:5s}: {total / 2**20:8.3f} MiB, of which padding {pad / 2**20:7.3f} MiB "
            f"({pad / max(total, 1):5.1%}); to other ranks {away / 2**20:7.3f} MiB; "
            f"control (counts, checks, router gradients) {summary[mode]['control_bytes'] / 2**10:.1f} KiB")
    formula = ep_mod.step_bytes(T_local, E, K, D, P, cf, item, "fixed")["per_step"] * P
    say(f"  fixed by the formula 4 * P * E * C * D * 4 bytes = {formula / 2**20:.3f} MiB")

    say("\nTime per step, mean over ranks (ms; the exchange includes waiting for slower ranks):")
    say(f"  {'':5s}  " + " ".join(f"{k:>9s}" for k in ep_mod.TIME_KEYS))
    for mode in ep_mod.EXCHANGES:
        say(f"  {mode:5s}  " + " ".join(f"{v:9.3f}" for v in summary[mode]["times_ms"]))

    # Bytes per step against the capacity factor, both modes
    factors = [0.5, 1.0, 1.5, 2.0] if args.quick else [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5]
    sweep: dict[str, list[float]] = {"exact": [], "fixed": [], "fixed (formula)": []}
    for f in factors:
        lay = make_layer(D, H, E, K, f, skew)
        for mode in ep_mod.EXCHANGES:
            st, _ = one_step(lay, comm, mode, x, dy)
            sweep[mode].append(st["bytes"].sum() / 2**20)
        sweep["fixed (formula)"].append(
            ep_mod.step_bytes(T_local, E, K, D, P, f, item, "fixed")["per_step"] * P / 2**20)
    say("\nBytes per step (MiB, all ranks) against the capacity factor:")
    say(f"  {'factor':>6s} " + " ".join(f"{k:>15s}" for k in sweep))
    for i, f in enumerate(factors):
        say(f"  {f:6.2f} " + " ".join(f"{v[i]:15.3f}" for v in sweep.values()))

    result = {"P": P, "T_local": T_local, "D": D, "E": E, "K": K, "capacity": C,
              "capacity_factor": cf, "dropped": drops, "rows": rows.tolist(), "summary": summary,
              "factors": factors, "sweep_mib": sweep, "pictures": {}}
    if rank == 0:
        out = args.out
        paths = [f"{out}/06_bytes_heatmap.png", f"{out}/06_bytes_vs_capacity.png"]
        result["pictures"][paths[0]] = viz.send_matrices(
            {"exact exchange: kept rows": stats["exact"]["bytes"][0],
             "fixed exchange: [E/P, C, D] buffers": stats["fixed"]["bytes"][0],
             "of which padding": stats["fixed"]["padding_bytes"][0]}, paths[0],
            title=f"bytes each rank sends in the dispatch all-to-all (one of 4 per step), P={P}, "
                  f"E={E}, T_local={T_local}, D={D}, capacity factor {cf}")
        bound = ep_mod.step_bytes(T_local, E, K, D, P, None, item, "exact")["per_step"] * P
        result["pictures"][paths[1]] = viz.curves(
            factors, {m: sweep[m] for m in ep_mod.EXCHANGES}, paths[1],
            xlabel="capacity factor", ylabel="MiB per step, all ranks",
            reference=(bound / 2**20, "exact, nothing dropped: 4 P K T_local D 4 bytes"),
            title=f"all-to-all bytes per step (measured; fixed = 4 P E C D 4 bytes exactly)\n"
                  f"P={P}, E={E}, K={K}, T_local={T_local}, D={D}, float32")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "06_expert_parallel.json"), "w") as f:
            json.dump({k: v for k, v in result.items() if k != "pictures"}, f, indent=1)
    return result


if __name__ == "__main__":
    try:
        ep_mod.mpi()
    except ImportError as err:  # one line, not a traceback: the `mpi` extra is optional
        sys.exit(f"06_expert_parallel.py: {err}")
    main()
