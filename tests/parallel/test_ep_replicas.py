"""Redundant experts (ExpertParallelMoE(placement=phy2log), pymoe.ep_replicas) under mpiexec.

Against the one-process layer without replicas (MoELayer(token_groups=P)): routing, outputs and
input gradients equal (bit for bit where noted), every replica's parameter gradient is the sum
over the expert's replicas and equals the unreplicated gradient to rounding, replicas of one
expert get identical gradients (bit for bit), and a placement of one slot per expert is the
plain exchange, bit for bit in everything.
"""
from __future__ import annotations

import numpy as np
import pytest
from test_expert_parallel import _expect_fault, _fault_launch, launch, mpiexec  # noqa: F401

import expert_parallel_cases as epc
from pymoe import eplb

# y and dx are sums over K expert outputs and the router path, all float64 here unless the case
# says float32; the replicas' rows meet the same weights, so only a BLAS that picks another
# kernel for another row count could change a bit: 1e-12 relative (float64) / 1e-5 (float32)
# holds that with a wide margin. Gradient sums over split rows differ by the order of addition.
RTOL = {"float64": 1e-12, "float32": 1e-5}


def eplb_placement(case: dict, P: int, redundant: int) -> list[int]:
    """phy2log from pymoe.eplb on the case's own routed loads (the kept rows per expert)."""
    ref = epc.reference(case, P)
    load = sum(r.expert_load_kept for r in ref["routing"])  # [E]
    phy2log, _, _ = eplb.rebalance_experts(load[None], len(load) + redundant, 1, 1, P)
    return phy2log[0].tolist()


def check(case: dict, ranks: list[dict]) -> dict[str, float]:
    """Every claim of the module docstring; -> the largest differences measured."""
    P = len(ranks)
    ref = epc.reference(case, P)
    c = epc.full(case)
    T, place = c["T_local"], np.asarray(c["ep_kw"]["placement"])
    Nl = len(place) // P
    rtol = RTOL[c["dtype"]]
    diffs = {"y": 0.0, "dx": 0.0, "expert_grads": 0.0, "expert_grads_relative": 0.0}
    for r, res in enumerate(ranks):
        assert isinstance(res, dict), res
        for k in ("y", "dx"):
            want = ref[k][r * T:(r + 1) * T]
            np.testing.assert_allclose(res[k], want, rtol=rtol, atol=rtol)
            diffs[k] = max(diffs[k], float(np.abs(res[k] - want).max()))
        replicated = [n for n in ref["grads"] if n not in ("w1", "b1", "w2", "b2")]
        for n in replicated:  # the router's and shared experts': not summed over replicas, but
            # their dgate reads the expert outputs, which another row count may round apart
            # (OpenBLAS's Haswell kernel does; SkylakeX gives the same bits)
            np.testing.assert_allclose(res[f"grad_{n}"], ref["grads"][n], rtol=rtol, atol=rtol)
        for n in ("w1", "b1", "w2", "b2"):
            want = ref["grads"][n][place[r * Nl:(r + 1) * Nl]]
            np.testing.assert_allclose(res[f"grad_{n}"], want, rtol=rtol, atol=rtol)
            d = float(np.abs(res[f"grad_{n}"] - want).max())
            diffs["expert_grads"] = max(diffs["expert_grads"], d)
            diffs["expert_grads_relative"] = max(diffs["expert_grads_relative"],
                                                 d / float(np.abs(want).max() or 1.0))
    for n in ("w1", "b1", "w2", "b2"):  # replicas of one expert: identical gradients
        every = np.concatenate([res[f"grad_{n}"] for res in ranks])  # [N, ...]
        for e in range(c["E"]):
            slots = np.flatnonzero(place == e)
            for s in slots[1:]:
                np.testing.assert_array_equal(every[s], every[slots[0]])
    return diffs


def cases(P: int) -> list[dict]:
    E = 4 if P == 2 else 8
    skewed = {"skew": 3.0, "E": E, "T_local": 16}
    return [
        {**skewed, "ep_kw": {"placement": eplb_placement(skewed, P, P)}},
        {**skewed, "dtype": "float32", "capacity_factor": None, "K": 1,
         "ep_kw": {"placement": eplb_placement({**skewed, "capacity_factor": None, "K": 1}, P,
                                               2 * P)}},
        # two replicas of expert 0 on one rank, expert 0's third on another; with global load
        # statistics, a shared expert and padding (what the exchange does not touch)
        {"E": E, "load_stats": "global", "layer_kw": {"num_shared_experts": 1}, "pad": 0.25,
         "ep_kw": {"placement": [0, 1, 0, 0, 2, 3] if P == 2
                   else [0, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2]}},
    ]


@pytest.mark.parametrize("P", [2, 4])
def test_replicas_match_one_process(mpiexec, tmp_path, P):  # noqa: F811
    cs = cases(P)
    # one slot per expert: the replica exchange must give the plain layer's bits, all of them
    plain = [{"E": 8, "skew": 2.0, "ep_kw": {"placement": list(range(8))}},
             {"E": 8, "skew": 2.0, "ep_kw": {"placement": [7, 3, 5, 1, 0, 2, 4, 6]}}]
    proc, results = launch(mpiexec, P, cs + plain, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = [check(case, ranks) for case, ranks in zip(cs, results)]
    print(f"P={P} largest |difference| to the layer without replicas: {measured}")
    for case, ranks in zip(plain, results[len(cs):]):
        place = np.asarray(case["ep_kw"]["placement"])
        moved = {**case, "ep_kw": {}}
        ref = epc.reference(moved, P)
        T, Nl = epc.full(case)["T_local"], 8 // P
        for r, res in enumerate(ranks):
            assert isinstance(res, dict), res
            np.testing.assert_array_equal(res["y"], ref["y"][r * T:(r + 1) * T])
            np.testing.assert_array_equal(res["dx"], ref["dx"][r * T:(r + 1) * T])
            for n in ("w1", "b1", "w2", "b2"):
                np.testing.assert_array_equal(res[f"grad_{n}"],
                                              ref["grads"][n][place[r * Nl:(r + 1) * Nl]])
    # rows travel to the slots: each rank sends its kept rows, and gets back as many as it sent
    for case, ranks in zip(cs, results):
        ref = epc.reference(case, P)
        for r, res in enumerate(ranks):
            assert res["rows_dispatch"].sum() == ref["routing"][r].expert_load_kept.sum()
        sent = np.stack([res["rows_dispatch"] for res in ranks])  # [P, P] sender, receiver
        back = np.stack([res["rows_combine"] for res in ranks])
        np.testing.assert_array_equal(back, sent.T)


def test_bad_placements_fail_on_every_rank(mpiexec, tmp_path):  # noqa: F811
    bad = [({"ep_kw": {"placement": [0, 1, 2]}}, "N = 3 slots"),
           ({"ep_kw": {"placement": [0, 1, 2, 2]}}, "experts [3] have no slot"),
           ({"ep_kw": {"placement": [0, 1, 2, 4]}}, "must lie in [0, 4)"),
           ({"ep_kw": {"placement": [0, 1, 2, 3]}, "exchange": "fixed"}, "exchange"),
           ({"ep_kw": {"placement": [[0, 1, 2, 3]]}}, "placement: expected integers"),
           ({"ep_kw": {"placement": [0, 1, 2, 3]}, "ep_kw_on_rank": {"1": {"placement": [
               3, 2, 1, 0]}}}, "settings differ across ranks")]
    proc, results = launch(mpiexec, 2, [b for b, _ in bad], tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (_, words), ranks in zip(bad, results):
        for res in ranks:
            assert isinstance(res, str) and res.startswith("ValueError") and words in res, res


def test_a_fault_in_the_replica_path_ends_every_rank(mpiexec, tmp_path):  # noqa: F811
    place = {"ep_kw": {"placement": [0, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2]}, "E": 8}
    faults = [{**place, "fault": {"rank": 2, "at": at, "kind": kind}}
              for at, kind in (("replicated_parts", "MemoryError"),
                               ("replicated_parts", "ValueError"),
                               ("experts_backward", "RuntimeError"))]
    results = _fault_launch(mpiexec, 4, faults + [place], tmp_path / "out")
    for case, ranks in zip(faults, results):
        _expect_fault(case, ranks)
    assert all(isinstance(r, dict) for r in results[-1])


def test_example_06_eplb(mpiexec, tmp_path):  # noqa: F811
    """examples/06 --eplb on 4 ranks: the same rows, spread more evenly, same outputs."""
    import json
    import os
    import subprocess
    import sys

    from helpers import REPO

    env = {**os.environ, "PYTHONPATH": REPO, "MPLBACKEND": "Agg"}
    proc = subprocess.run([mpiexec, "-n", "4", sys.executable,
                           os.path.join(REPO, "examples", "06_expert_parallel.py"), "--eplb",
                           "--quick", "--out", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "06_eplb.json").read_text())
    before, after = np.array(res["rows_before"]), np.array(res["rows_after"])
    assert before.sum() == after.sum() == sum(res["expert_rows"])
    assert after.max() < before.max() and res["max_over_mean"][1] < res["max_over_mean"][0]
    # the same bits where every expert matmul's blocking is the same (SkylakeX: 4 of 4 ranks);
    # a replica's matmul sees fewer rows, which another BLAS kernel may round apart (Haswell)
    assert (res["max_y_dx_diff"] == 0) == (res["ranks_bit_identical"] == 4)
    assert res["max_y_dx_diff"] <= 1e-4  # float32 outputs of order 1, sums of D + H terms
    # the split rule cuts an expert's rows within one row of EPLB's even split: < 1 row per slot
    np.testing.assert_allclose(after, res["eplb_estimate"], atol=res["N"] // res["P"])
    from pymoe.viz import have_matplotlib

    if have_matplotlib():
        assert (tmp_path / "06_eplb_load_per_rank.png").stat().st_size > 10_000


def test_split_rule_literal_and_against_a_loop():
    from pymoe import ep_replicas as rep

    # expert 0: 5 rows (rank 0's 2, then rank 1's 3) over 2 replicas: rows [0, 2) and [2, 5)
    m = rep.split_rows(np.array([[2, 1], [3, 0]]), np.array([2, 1]))
    np.testing.assert_array_equal(m, [[[2, 0], [1, 0]], [[0, 3], [0, 0]]])
    np.testing.assert_array_equal(rep.replica_slots(np.array([1, 0, 2, 0, 1]), 3),
                                  [[1, 3], [0, 4], [2, -1]])
    rng = np.random.default_rng(0)
    for _ in range(50):
        P, E = int(rng.integers(1, 5)), int(rng.integers(1, 6))
        counts, cnt = rng.integers(0, 7, (P, E)), rng.integers(1, 4, E)
        m = rep.split_rows(counts, cnt)
        for e in range(E):  # row by row: global row g of expert e goes to chunk j
            n, owner = counts[:, e].sum(), np.repeat(np.arange(P), counts[:, e])
            want = np.zeros((P, m.shape[2]), dtype=np.int64)
            for g in range(n):
                j = next(j for j in range(cnt[e]) if j * n // cnt[e] <= g < (j + 1) * n // cnt[e])
                want[owner[g], j] += 1
            np.testing.assert_array_equal(m[:, e], want)


FD_SCRIPT = r"""
import numpy as np
import pymoe
from helpers import FD_RTOL, numerical_grad, randomize, rel_error
from pymoe.expert_parallel import ExpertParallelMoE

layer = pymoe.MoELayer(5, 4, 4, 2, 1.0, aux_loss_coef=0.05, z_loss_coef=0.01, seed=1,
                       dtype=np.float64)
randomize(layer, 1)
place = np.array([0, 1, 0, 2, 3, 0, 1, 2])  # expert 0 three times, 1 and 2 twice, in a 1-rank world
ep = ExpertParallelMoE(layer, placement=place)
rng = np.random.default_rng(2)
x, dy = rng.normal(size=(12, 5)), rng.normal(size=(12, 5))


def objective():
    y = ep.forward(x)
    return float(np.sum(y * dy)) + layer.aux_loss_coef * ep.aux_loss + layer.z_loss_coef * ep.z_loss


objective()
dx = ep.backward(dy)
base = ep.routing.expert_index.copy()
errors = {"x": rel_error(dx, numerical_grad(objective, x))}
for n in ("w1", "b1", "w2", "b2"):  # a logical parameter moves all its replicas together
    for e in range(4):
        slots = np.flatnonzero(place == e)
        logical = ep.params[n][slots[0]].copy()

        def f(slots=slots, logical=logical, n=n):
            ep.params[n][slots] = logical
            return objective()

        numeric = numerical_grad(f, logical)
        ep.params[n][slots] = logical
        for s in slots:
            errors[f"{n}[{e}] slot {s}"] = rel_error(ep.grads[n][s], numeric)
for n in ("w_router", "b_router"):
    errors[n] = rel_error(ep.grads[n], numerical_grad(objective, ep.params[n]))
objective()
assert (ep.routing.expert_index == base).all(), "routing moved under the finite differences"
worst = max(errors, key=errors.get)
assert errors[worst] < FD_RTOL, (worst, errors[worst])
print(f"worst {worst}: {errors[worst]:.1e} over {len(errors)} gradients")
"""


def test_replica_gradients_against_finite_differences(tmp_path):
    """float64, one rank (no mpiexec: a 1-rank world) with 3, 2 and 2 copies of experts 0..2: a
    logical parameter's gradient is the derivative with all its copies moved together, and every
    copy holds it."""
    import os
    import subprocess
    import sys

    from helpers import REPO, require_optional

    require_optional(subprocess.run([sys.executable, "-c", "from mpi4py import MPI"],
                                    capture_output=True).returncode == 0, "mpi4py is missing")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")])}
    proc = subprocess.run([sys.executable, "-c", FD_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
