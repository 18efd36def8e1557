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
                           token_groups=token_groups, load_stats=c["load_stats"],
                           **c.get("layer_kw", {}))
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


def token_mask(case: dict, P: int) -> np.ndarray | None:
    """`<bool>[P * T_local]` True = a real token for a case with "pad" (the share of padding
    tokens, drawn) and "all_pad_rank" (a rank whose tokens are all padding), else None."""
    c = full(case)
    if "pad" not in c:
        return None
    T = P * c["T_local"]
    m = np.random.default_rng(c["seed"] + 200).random(T) >= c["pad"]
    m[0] = True  # at least one real token
    r = c.get("all_pad_rank")
    if r is not None and r < P and P > 1:
        m[r * c["T_local"]:(r + 1) * c["T_local"]] = False
    return m


def run_rank(case: dict, comm) -> dict:
    """Forward + backward of one case on this rank; what the test compares."""
    from pymoe.expert_parallel import ExpertParallelMoE

    c = full(case)
    P, rank = comm.Get_size(), comm.Get_rank()
    if c.get("zero_exchange"):
        return zero_exchange(c, comm)
    layer = build_layer({**case, "layer_kw": {**c.get("layer_kw", {}),
                                              **c.get("layer_kw_on_rank", {}).get(str(rank), {})}})
    if c.get("mismatch_rank") == rank:  # a rank whose parameters differ
        layer.params["w1"] = layer.params["w1"] * 2
    if c.get("extra_param_rank") == rank:  # a rank with a parameter the others lack
        layer.params["extra"] = np.zeros(3, layer.dtype)
    if c.get("num_experts_on_rank", {}).get(str(rank)):
        import pymoe
        layer = pymoe.MoELayer(c["D"], c["H"], c["num_experts_on_rank"][str(rank)], c["K"])
    fault = c.get("fault")
    if fault and fault.get("at") == "setup" and fault["rank"] == rank:
        inject(fault, layer)
    ep = ExpertParallelMoE(layer, comm, exchange=c["exchange"], load_stats=c["load_stats"],
                           **{n: c[n] for n in ("ranks_per_node", "dedup", "max_nodes") if n in c},
                           **{**c.get("ep_kw", {}), **c.get("ep_kw_on_rank", {}).get(str(rank), {})})
    if c.get("bias_drift_rank") == rank:  # a bias updated on one rank only
        layer.expert_bias = np.full(c["E"], 1e-3)
    if c.get("nan_param_rank") == rank:  # "update in place", with a NaN
        ep.params["w1"][0, 0, 0] = np.nan
    if fault and fault.get("at") not in ("setup", "backward") and fault["rank"] == rank:
        inject(fault, layer)
    x, dy = inputs(case, P)
    sl = slice(rank * c["T_local"], (rank + 1) * c["T_local"])
    x, dy = x[sl], dy[sl]
    if c.get("empty_rank") == rank:
        x, dy = x[:0], dy[:0]
    if c.get("overflow_rank") == rank:  # finite, but its router logits overflow
        x = x.copy()
        x[0] = np.finfo(x.dtype).max
    m = token_mask(case, P)
    if m is not None and c.get("mask_rank_only", rank) != rank:
        m = None  # a mask on one rank only
    y = ep.forward(x) if m is None else ep.forward(x, m[sl])
    if fault and fault.get("at") == "backward" and fault["rank"] == rank:
        ep._cache = FailingCache(ep._cache, FAULT_KINDS[fault["kind"]])  # backward()'s checks
    dx = ep.backward(dy)
    if c.get("backward_twice"):
        dx2 = ep.backward(dy)
        assert np.array_equal(dx, dx2), "a second backward() differs"
    st = ep.stats
    out = {"y": y, "dx": dx, "aux": np.array(ep.aux_loss), "z": np.array(ep.z_loss),
           "capacity": np.array(ep.routing.capacity)}
    out.update({f"grad_{n}": g for n, g in ep.grads.items()})
    for d in st.rows:
        out[f"rows_{d}"], out[f"bytes_{d}"] = st.rows[d], st.bytes[d]
        out[f"padding_{d}"] = st.padding_bytes[d]
        out[f"wire_rows_{d}"], out[f"wire_bytes_{d}"], out[f"wire_messages_{d}"] = st.wire(d)
    out["meta_bytes"] = np.array(st.meta_bytes)
    return out


FAULT_POINTS = ("setup", "route_tokens", "dispatch", "experts_forward", "combine", "backward",
                "gate_grad", "experts_backward", "router_backward")
REPLICA_FAULT_POINTS = ("replicated_parts",)  # the replicas' gradient sum (pymoe.ep_replicas)
FAULT_KINDS = {"MemoryError": MemoryError, "RuntimeError": RuntimeError,
               "KeyboardInterrupt": KeyboardInterrupt, "ValueError": ValueError,
               "ZeroDivisionError": ZeroDivisionError}


class FailingCache(tuple):
    """A forward cache whose first read raises: backward() fails in its own checks."""

    def __new__(cls, items, kind):
        self = super().__new__(cls, items)
        self.kind = kind
        return self

    def __getitem__(self, i):
        raise self.kind("injected at backward")


def inject(fault: dict, layer) -> None:
    """Make one step of this rank raise fault["kind"] at fault["at"] (FAULT_POINTS), the way an
    out-of-memory expert matmul or a Ctrl-C would: by replacing the function called there."""
    import pymoe.expert_parallel as ep_mod
    import pymoe.token_groups as tg

    kind = FAULT_KINDS[fault["kind"]]

    def boom(*args, **kwargs):
        raise kind(f"injected at {fault['at']}")

    at = fault["at"]
    if at == "setup":
        ep_mod._digest = boom  # the parameter digests of the setup check
    elif at == "route_tokens":
        layer.route_tokens = boom
    elif at in ("experts_forward", "experts_backward"):
        setattr(tg, at, boom)
    elif at == "router_backward":
        tg.router_logits_backward = boom
    elif at in REPLICA_FAULT_POINTS:
        import pymoe.ep_replicas as rep
        setattr(rep, at, boom)
    else:  # dispatch, combine, gate_grad: the backend's own functions
        backend = layer.backend

        class Failing:
            def __getattr__(self, name):
                return boom if name == at else getattr(backend, name)

        layer.backend = Failing()


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
    y = layer.forward(x, token_mask(case, P))
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

    replicated = [n for n in ref["grads"] if n not in ("w1", "b1", "w2", "b2")]
    for r, res in enumerate(ranks):
        same(f"rank {r} y", res["y"], ref["y"][r * T:(r + 1) * T])
        same(f"rank {r} dx", res["dx"], ref["dx"][r * T:(r + 1) * T])
        for n in replicated:  # the router's and the shared experts'
            if f"grad_{n}" not in res:
                bad.append(f"rank {r}: no gradient of {n}")
                continue
            same(f"rank {r} grad {n}", res[f"grad_{n}"], ref["grads"][n])
        for n in ("w1", "b1", "w2", "b2"):
            same(f"rank {r} grad {n}", res[f"grad_{n}"], ref["grads"][n][r * El:(r + 1) * El])
    return bad


def _patchable() -> dict:
    import pymoe.ep_replicas as rep
    import pymoe.expert_parallel as ep_mod
    import pymoe.token_groups as tg

    return {(m, n): getattr(m, n) for m, names in ((ep_mod, ("_digest",)), (tg, (
        "experts_forward", "experts_backward", "router_logits_backward")),
        (rep, REPLICA_FAULT_POINTS)) for n in names}


def _restore(saved: dict) -> None:
    for (m, n), v in saved.items():
        setattr(m, n, v)


def main(argv: list[str]) -> int:
    from mpi4py import MPI

    out_dir, cases = argv[0], json.loads(argv[1])
    catch: tuple = (ValueError, TypeError) if argv[2:] != ["--no-catch"] else ()
    if argv[2:] == ["--catch-all"]:  # the fault cases: every exception recorded, the job goes on
        catch = (BaseException,)
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    for i, case in enumerate(cases):
        try:
            saved = _patchable()
            try:
                res = run_rank(case, comm)
            finally:
                _restore(saved)
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
