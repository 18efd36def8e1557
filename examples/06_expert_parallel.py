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

- Nodes (--ranks-per-node R): the P ranks stand for P/R nodes. What crosses a node boundary is
  what costs (InfiniBand is about ten times slower than NVLink): every step's rows, bytes and
  messages split into intra- and inter-node, with a modelled time for real links beside the
  measured one. The hierarchical exchange sends the same inter-node bytes in fewer, larger
  messages; node-limited routing (--max-nodes M: each token's experts on at most M nodes) with
  per-node deduplication (DeepEP: a token crosses to a node once, however many of its experts
  live there) cuts the inter-node bytes themselves.

Run:  mpiexec -n 4 python examples/06_expert_parallel.py [--quick] [--out DIR]
          [--ranks-per-node R] [--max-nodes M] [--eplb]
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
from pymoe import ep_nodes, viz  # noqa: E402
from pymoe import expert_parallel as ep_mod  # noqa: E402


def make_layer(D: int, H: int, E: int, K: int, cf: float | None, skew: float,
               **routing: int) -> pymoe.MoELayer:
    """The same layer on every rank (same seed); the router bias makes expert e's logit
    skew * e lower, so the low-numbered experts (on the low ranks) are the popular ones.
    routing: node-limited routing's keywords (pymoe.ep_nodes.node_limited_routing), or none."""
    layer = pymoe.MoELayer(D, H, E, K, cf, dtype=np.float32, seed=0, **routing)
    layer.params["b_router"][:] = -skew * np.arange(E)
    return layer


def one_step(layer: pymoe.MoELayer, comm, exchange: str, x: np.ndarray, dy: np.ndarray,
             repeats: int = 1, **nodes) -> tuple[dict[str, np.ndarray], ep_mod.ExpertParallelMoE]:
    """Forward + backward on every rank; gathered P x P statistics (times: the median step).
    nodes: ExpertParallelMoE's ranks_per_node, dedup, max_nodes."""
    ep = ep_mod.ExpertParallelMoE(layer, comm, exchange=exchange, **nodes)
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
    gap = comm.allreduce(max(float(np.abs(y1 - y0).max()), float(np.abs(dx1 - dx0).max())),
                         op=ep_mod.mpi().MAX)  # 0 where every matmul saw the same bits
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
           "ranks_bit_identical": same, "max_y_dx_diff": gap, "max_expert_grad_diff": dw, "pictures": {}}
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
    ap.add_argument("--ranks-per-node", type=int, default=1,
                    help="R: the P ranks form P/R nodes (default 1: every rank its own node)")
    ap.add_argument("--max-nodes", type=int, default=None,
                    help="M: node-limited routing in the nodes part, each token's experts on at "
                         "most M nodes (default: no limit)")
    args = ap.parse_args(argv)
    MPI = ep_mod.mpi()
    comm = MPI.COMM_WORLD
    P, rank = comm.Get_size(), comm.Get_rank()
    R = ep_nodes.check_ranks_per_node(args.ranks_per_node, P)
    if args.max_nodes is not None:
        ep_nodes.node_limited_routing(P, R, args.max_nodes)  # checks M <= P / R
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
        say(f"  {mode:5s}  " + " ".join(f"{v:9.3f}" for v in summary[mode]["times_ms"][:4]))

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

    nodes = node_part(comm, R, args.max_nodes, D, H, E, K, cf, skew, x, dy, repeats, say)
    result = {"P": P, "T_local": T_local, "D": D, "E": E, "K": K, "capacity": C,
              "capacity_factor": cf, "dropped": drops, "rows": rows.tolist(), "summary": summary,
              "factors": factors, "sweep_mib": sweep, "nodes": nodes, "pictures": {}}
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
        path = f"{out}/06_inter_node_bytes.png"
        ib = nodes["inter_bytes_sweep"]
        series = {}
        for plain in ("", " + dedup"):  # one line where the two exchanges send the same bytes
            f, h = ib["flat" + plain], ib["hierarchical" + plain]
            if f == h:
                series["flat = hierarchical" + plain] = [b / 2**20 for b in f]
            else:
                series["flat" + plain], series["hierarchical" + plain] = (
                    [b / 2**20 for b in f], [b / 2**20 for b in h])
        result["pictures"][path] = viz.curves(
            nodes["max_nodes_sweep"], series, path,
            xlabel="M: nodes each token may reach (node-limited routing)",
            ylabel="inter-node MiB per step, all ranks",
            title=f"inter-node bytes per step (measured), {P // R} nodes x {R} ranks\nE={E}, "
                  f"K={K}, T_local={T_local}, D={D}, float32 (hierarchical: fewer messages)")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "06_expert_parallel.json"), "w") as f:
            json.dump({k: v for k, v in result.items() if k != "pictures"}, f, indent=1)
    return result


NODE_MODES = {"flat": ("exact", False), "flat + dedup": ("exact", True),
              "hierarchical": ("hierarchical", False),
              "hierarchical + dedup": ("hierarchical", True)}


def node_part(comm, R: int, max_nodes: int | None, D: int, H: int, E: int, K: int, cf: float,
              skew: float, x: np.ndarray, dy: np.ndarray, repeats: int, say) -> dict:
    """The four node-aware exchanges: intra/inter split, measured vs modelled time, and the
    inter-node bytes against M (node-limited routing)."""
    P = comm.Get_size()
    N = P // R
    limit = {} if max_nodes is None else ep_nodes.node_limited_routing(P, R, max_nodes)
    say(f"\nNodes: {N} node(s) of {R} rank(s) (--ranks-per-node {R}); routing "
        + (f"node-limited to M = {max_nodes} node(s) per token" if limit else "not node-limited")
        + ";\nper step, all ranks; fwd = dispatch + combine, bwd = their gradients:")
    say(f"  {'':25s} {'intra rows':>10s} {'KiB':>8s} {'msgs':>5s} {'inter rows':>10s} "
        f"{'KiB':>8s} {'msgs':>5s} {'measured ms':>11s} {'modelled ms':>11s}")
    table, links = {}, ep_nodes.Links()
    layer = make_layer(D, H, E, K, cf, skew, **limit)
    for name, (mode, dedup) in NODE_MODES.items():
        st, _ = one_step(layer, comm, mode, x, dy, repeats, ranks_per_node=R, dedup=dedup,
                         max_nodes=max_nodes)
        split = ep_nodes.node_split({k: st[f"wire_{k}"] for k in ep_nodes.SPLIT_KEYS}, R)
        modelled = ep_nodes.modelled_seconds(split, links)  # [4] per exchange
        measured = st["times"][:, 1].mean()  # "exchange": packing + MPI, mean over ranks
        row = {f"{w}_{k}": [int(split[w][k][:2].sum()), int(split[w][k][2:].sum())]
               for w in ("intra", "inter") for k in ep_nodes.SPLIT_KEYS}
        row.update(measured_exchange_ms=1e3 * float(measured),
                   measured_mpi_ms=1e3 * float(st["times"][:, 4].mean()),
                   modelled_ms=[1e3 * float(modelled[:2].sum()), 1e3 * float(modelled[2:].sum())],
                   meta_bytes=int(st["meta_bytes"].sum()))
        table[name] = row
        for part, i in (("fwd", 0), ("bwd", 1)):
            label = f"{name if i == 0 else '':20s} {part}"
            say(f"  {label:25s} {row['intra_rows'][i]:10d} {row['intra_bytes'][i] / 2**10:8.1f} "
                f"{row['intra_messages'][i]:5d} {row['inter_rows'][i]:10d} "
                f"{row['inter_bytes'][i] / 2**10:8.1f} {row['inter_messages'][i]:5d} "
                + (f"{row['measured_exchange_ms']:11.3f}" if i == 0 else f"{'':11s}")
                + f" {row['modelled_ms'][i]:11.4f}")
    say(f"  measured ms: the exchange here, forward + backward, mean over ranks (P processes on "
        f"one machine);\n  modelled ms: a model of real links ({links.intra_bandwidth / 1e9:.0f} "
        f"GB/s and {links.intra_latency * 1e6:.0f} us per message inside a node, "
        f"{links.inter_bandwidth / 1e9:.0f} GB/s and {links.inter_latency * 1e6:.0f} us between "
        "nodes;\n  pymoe.ep_nodes.Links), not a measurement")
    sweep = list(range(1, N + 1))
    inter: dict[str, list[int]] = {m: [] for m in NODE_MODES}
    for M in sweep:
        lay = make_layer(D, H, E, K, cf, skew, **ep_nodes.node_limited_routing(P, R, M))
        for name, (mode, dedup) in NODE_MODES.items():
            st, _ = one_step(lay, comm, mode, x, dy, ranks_per_node=R, dedup=dedup, max_nodes=M)
            split = ep_nodes.node_split({k: st[f"wire_{k}"] for k in ep_nodes.SPLIT_KEYS}, R)
            inter[name].append(int(split["inter"]["bytes"].sum()))
    say("\nInter-node KiB per step (all ranks) against M, node-limited routing:")
    say(f"  {'M':>3s} " + " ".join(f"{m:>21s}" for m in NODE_MODES))
    for i, M in enumerate(sweep):
        say(f"  {M:3d} " + " ".join(f"{inter[m][i] / 2**10:21.1f}" for m in NODE_MODES))
    return {"ranks_per_node": R, "nodes": N, "max_nodes": max_nodes, "table": table,
            "max_nodes_sweep": sweep, "inter_bytes_sweep": inter}


if __name__ == "__main__":
    try:
        ep_mod.mpi()
    except ImportError as err:  # one line, not a traceback: the `mpi` extra is optional
        sys.exit(f"06_expert_parallel.py: {err}")
    main()
