"""Cases for the expert-parallel tests, shared by the mpiexec worker and the one-process checks.

A case is a dict of plain values (it travels as JSON to the worker). Run as a script under
mpiexec, this file is the worker: every rank runs each case and saves what it computed.

    mpiexec -n P python tests/expert_parallel_cases.py OUT_DIR CASES_JSON
"""
from __future__ import annotations

import json
import os
import sys
import traceback

import numpy as np

CASE_DEFAULTS = dict(D=8, H=6, E=4, K=2, T_local=12, capacity_factor=1.0, dtype="float64",
                     backend="numpy", exchange="exact", load_stats="local", skew=0.0,
                     aux_loss_coef=0.05, z_loss_coef=0.01, priority="choice", activation="relu",
                     seed=3)


def full(case: dict) -> dict:
    return {**CASE_DEFAULTS, **case}


def build_layer(case: dict, token_groups: int = 1):
    """The layer of a case; skew > 0 routes each block of T_local tokens towards its own
    experts (uneven loads, ranks that send nothing to some experts, drops)."""
    import pymoe

    c = full(case)
    layer = pymoe.MoELayer(c["D"], c["H"], c["E"], c["K"], c["capacity_factor"],
                           priority=c["priority"], activation=c["activation"],
                           aux_loss_coef=c["aux_loss_coef"], z_loss_coef=c["z_loss_coef"],
                           backend=c["backend"], dtype=np.dtype(c["dtype"]), seed=c["seed"],
                           token_groups=token_groups, load_stats=c["load_stats"])
    if c["skew"]:
        D, E = c["D"], c["E"]
        w = np.zeros((D, E))
        w[np.arange(D), np.arange(D) % E] = 1.0
        layer.params["w_router"] = (layer.params["w_router"] + w).astype(layer.dtype)
    return layer


def inputs(case: dict, P: int) -> tuple[np.ndarray, np.ndarray]:
    """x and dy `[P * T_local, D]` of all ranks together, in the case's dtype."""
    c = full(case)
    rng = np.random.default_rng(c["seed"] + 100)
    T, D = P * c["T_local"], c["D"]
    x = rng.normal(size=(T, D))
    if c["skew"]:
        for r in range(P):  # block r leans towards dims r, r+P, ... -> experts (r mod E), ...
            x[r * c["T_local"]:(r + 1) * c["T_local"], r % D::P] += c["skew"]
    dy = rng.normal(size=(T, D))
    return x.astype(c["dtype"]), dy.astype(c["dtype"])


def run_rank(case: dict, comm) -> dict:
    """Forward + backward of one case on this rank; what the test compares."""
    from pymoe.expert_parallel import ExpertParallelMoE

    c = full(case)
    P, rank = comm.Get_size(), comm.Get_rank()
    if c.get("zero_exchange"):
        return zero_exchange(c, comm)
    layer = build_layer(case)
    if c.get("mismatch_rank") == rank:  # a rank whose parameters differ
        layer.params["w1"] = layer.params["w1"] * 2
    if c.get("num_experts_on_rank", {}).get(str(rank)):
        import pymoe
        layer = pymoe.MoELayer(c["D"], c["H"], c["num_experts_on_rank"][str(rank)], c["K"])
    ep = ExpertParallelMoE(layer, comm, exchange=c["exchange"], load_stats=c["load_stats"])
    x, dy = inputs(case, P)
    sl = slice(rank * c["T_local"], (rank + 1) * c["T_local"])
    x, dy = x[sl], dy[sl]
    if c.get("empty_rank") == rank:
        x, dy = x[:0], dy[:0]
    if c.get("overflow_rank") == rank:  # finite, but its router logits overflow
        x = x.copy()
        x[0] = np.finfo(x.dtype).max
    y = ep.forward(x)
    dx = ep.backward(dy)
    st = ep.stats
    out = {"y": y, "dx": dx, "aux": np.array(ep.aux_loss), "z": np.array(ep.z_loss),
           "capacity": np.array(ep.routing.capacity)}
    out.update({f"grad_{n}": g for n, g in ep.grads.items()})
    for d in st.rows:
        out[f"rows_{d}"], out[f"bytes_{d}"] = st.rows[d], st.bytes[d]
        out[f"padding_{d}"] = st.padding_bytes[d]
    return out


def zero_exchange(c: dict, comm) -> dict:
    """The exchange with every row dropped: zero rows per expert from every rank."""
    from pymoe.expert_parallel import StepStats, _MPIExchange

    P, E, C, D = comm.Get_size(), 8, 3, 4
    st = StepStats(comm.Get_rank(), P, c["exchange"])
    ex = _MPIExchange(comm, E // P, c["exchange"], st)
    ex.set_loads([np.zeros(E, dtype=np.int64)], [C])
    packed, filled = ex.to_experts([np.zeros((E, C, D))])
    out = ex.from_experts(packed)[0]
    return {"filled": filled, "out": out, "rows": sum(st.rows.values()),
            "bytes": sum(st.bytes.values()), "padding": sum(st.padding_bytes.values())}


def reference(case: dict, P: int) -> dict:
    """What MoELayer(token_groups=P) computes in one process for all P * T_local tokens."""
    layer = build_layer(case, token_groups=P)
    x, dy = inputs(case, P)
    y = layer.forward(x)
    dx = layer.backward(dy)
    return {"y": y, "dx": dx, "grads": layer.grads, "aux": layer.aux_loss, "z": layer.z_loss,
            "routing": layer.routing if P > 1 else (layer.routing,)}


def mismatches(case: dict, ranks: list[dict]) -> list[str]:
    """Every way the P ranks' results differ, bit for bit, from the one-process reference."""
    P = len(ranks)
    ref = reference(case, P)
    T, El = full(case)["T_local"], full(case)["E"] // P
    bad = []

    def same(name, got, want):
        if got.dtype != want.dtype or got.shape != want.shape or not np.array_equal(got, want):
            err = (np.max(np.abs(got.astype(float) - want.astype(float)))
                   if got.shape == want.shape else "shape")
            bad.append(f"{name}: differs (max abs {err})")

    for r, res in enumerate(ranks):
        same(f"rank {r} y", res["y"], ref["y"][r * T:(r + 1) * T])
        same(f"rank {r} dx", res["dx"], ref["dx"][r * T:(r + 1) * T])
        for n in ("w_router", "b_router"):
            same(f"rank {r} grad {n}", res[f"grad_{n}"], ref["grads"][n])
        for n in ("w1", "b1", "w2", "b2"):
            same(f"rank {r} grad {n}", res[f"grad_{n}"], ref["grads"][n][r * El:(r + 1) * El])
    return bad


def main(argv: list[str]) -> int:
    from mpi4py import MPI

    out_dir, cases = argv[0], json.loads(argv[1])
    catch = (ValueError, TypeError) if argv[2:] != ["--no-catch"] else ()
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    for i, case in enumerate(cases):
        try:
            res = run_rank(case, comm)
            np.savez(os.path.join(out_dir, f"case{i}_rank{rank}.npz"), **res)
        except catch as err:  # a clean, collective refusal: record it, go on
            with open(os.path.join(out_dir, f"case{i}_rank{rank}.err"), "w") as f:
                f.write(f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
    comm.Barrier()  # every rank reached the end: nobody was left waiting in a collective
    with open(os.path.join(out_dir, f"done_rank{rank}"), "w") as f:
        f.write("ok")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main(sys.argv[1:]))
