"""Expert parallelism over MPI (pymoe.expert_parallel) against MoELayer(token_groups=P).

Each test launches `mpiexec -n P` with a timeout; every rank runs the cases of
expert_parallel_cases.py and saves its results, and the checks here read every rank's file:
outputs, input gradients and parameter gradients must equal the one-process layer's bit for bit.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import expert_parallel_cases as epc
import pymoe
from helpers import REPO, require_optional

WORKER = os.path.join(REPO, "tests", "expert_parallel_cases.py")
TIMEOUT = 240  # seconds per mpiexec launch; a hang fails the test instead of blocking CI


@functools.lru_cache(maxsize=1)
def _mpi_setup() -> tuple[str | None, str]:
    """(mpiexec path, '') or (None, why not)."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = here if os.path.exists(here) else shutil.which("mpiexec")
    probe = subprocess.run([sys.executable, "-c", "from mpi4py import MPI"], capture_output=True,
                           text=True, timeout=120)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no message"])[-1]
        return None, ("mpi4py with an MPI library is not importable "
                      f"(pip install 'pymoe-routing[mpi]'): {last}")
    if mpiexec is None:
        return None, "no mpiexec found (pip install 'pymoe-routing[mpi]' installs MPICH's)"
    return mpiexec, ""


@pytest.fixture(scope="module")
def mpiexec() -> str:
    path, why = _mpi_setup()
    require_optional(path is not None, why)
    return path


def launch(mpiexec: str, P: int, cases: list[dict], out, *extra: str):
    """Run the worker on P ranks; -> (process, per-case list of per-rank results or errors)."""
    out.mkdir(exist_ok=True)
    proc = subprocess.run([mpiexec, "-n", str(P), sys.executable, WORKER, str(out),
                           json.dumps(cases), *extra], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=REPO)
    results = []
    for i in range(len(cases)):
        ranks = []
        for r in range(P):
            npz, err = out / f"case{i}_rank{r}.npz", out / f"case{i}_rank{r}.err"
            ranks.append(dict(np.load(npz)) if npz.exists()
                         else err.read_text() if err.exists() else None)
        results.append(ranks)
    return proc, results


def _c_or_numpy() -> str:
    return "c" if pymoe.backends()["c"].available else "numpy"


def equivalence_cases() -> list[dict]:
    return [
        {},
        {"dtype": "float32"},
        {"exchange": "fixed"},
        {"exchange": "fixed", "dtype": "float32", "load_stats": "global"},
        {"load_stats": "global", "skew": 2.0},
        {"load_stats": "global", "skew": 2.0, "exchange": "fixed", "dtype": "float32"},
        {"skew": 3.0, "capacity_factor": 0.5},  # drops, uneven loads, ranks sending 0 rows
        {"skew": 4.0, "K": 1, "capacity_factor": 0.25, "exchange": "fixed", "dtype": "float32"},
        {"capacity_factor": None, "exchange": "fixed"},  # dropless: C differs from rank to rank
        {"capacity_factor": None, "skew": 2.0},
        {"priority": "score", "activation": "gelu", "E": 8, "K": 3, "dtype": "float32"},
        {"E": 8, "T_local": 5, "capacity_factor": 2.0, "exchange": "fixed"},
        {"backend": _c_or_numpy(), "skew": 1.0, "dtype": "float32"},
        {"backend": _c_or_numpy(), "exchange": "fixed", "capacity_factor": 0.75},
        {"activation": "swiglu", "skew": 2.0},  # gated forms: w1 [E, D, 2H] split by expert
        {"activation": "swiglu_oai", "backend": _c_or_numpy(), "dtype": "float32"},
        # issue 27: shared experts (item 4), random priorities (item 11), backward() twice
        {"layer_kw": {"num_shared_experts": 1}},
        {"layer_kw": {"num_shared_experts": 2, "shared_expert_gate": True}, "dtype": "float32",
         "exchange": "fixed", "skew": 2.0, "capacity_factor": 0.5},
        {"priority": "random", "capacity_factor": 0.5, "skew": 2.0},
        {"layer_kw": {"second_expert_policy": "random"}, "priority": "random",
         "capacity_factor": 0.75},
        {"backward_twice": True},
        {"activation": "swiglu", "layer_kw": {"num_shared_experts": 1, "shared_d_hidden": 24}},
        {"E": 4, "K": 1, "skew": 8.0},  # at P=4 every rank keeps all its rows: nothing crosses
    ]  # (the last case stays last: the checks below read it as such)


@pytest.mark.parametrize("P", [1, 2, 4])
def test_ranks_match_one_process_bit_for_bit(mpiexec, tmp_path, P):
    cases = equivalence_cases()
    proc, results = launch(mpiexec, P, cases, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case, ranks in zip(cases, results):
        assert all(isinstance(r, dict) for r in ranks), (case, ranks)
        assert epc.mismatches(case, ranks) == [], case

    def sent(i, d):  # P x P rows [sender, receiver] of case i, exchange d
        return np.array([r[f"rows_{d}"] for r in results[i]])

    for i, case in enumerate(cases):
        ranks, ref = results[i], epc.reference(case, P)
        El = epc.full(case)["E"] // P
        for r, res in enumerate(ranks):  # what rank r sends to q = its kept rows for q's experts
            kept = ref["routing"][r].expert_load_kept.reshape(P, El).sum(axis=1)
            np.testing.assert_array_equal(res["rows_dispatch"], kept)
            assert res["capacity"] == ref["routing"][r].capacity
            assert (res["padding_dispatch"] == 0).all() or epc.full(case)["exchange"] == "fixed"
        # the way back and the backward pass move the same rows the other way
        np.testing.assert_array_equal(sent(i, "combine"), sent(i, "dispatch").T)
        np.testing.assert_array_equal(sent(i, "grad_dispatch"), sent(i, "dispatch"))
        np.testing.assert_array_equal(sent(i, "grad_combine"), sent(i, "combine"))
        # aux loss: "local" is each rank's own (their mean is the layer's), "global" the same
        # number on every rank
        auxes = [float(r["aux"]) for r in ranks]
        if epc.full(case)["load_stats"] == "global":
            assert auxes == [ref["aux"]] * P
        else:
            assert np.mean(auxes) == pytest.approx(ref["aux"], rel=1e-6)
            for r in range(P):
                assert auxes[r] == ref["routing"][r].aux_loss

    # Exact and fixed exchanges: same rows, fixed pays the padding (cases 0 and 2 differ only there)
    exact, fixed = results[0], results[2]
    for a, b in zip(exact, fixed):
        for d in epc_directions():
            np.testing.assert_array_equal(a[f"rows_{d}"], b[f"rows_{d}"])
            np.testing.assert_array_equal(b[f"bytes_{d}"] - b[f"padding_{d}"], a[f"bytes_{d}"])
    # The cases cover what they claim
    drops = [c for c in cases if any(r.dropped_fraction > 0 for r in epc.reference(c, P)["routing"])]
    assert len(drops) >= 3
    if P > 1:
        # some rank sends nothing to some expert
        assert any((r.expert_load_kept == 0).any() for r in epc.reference(cases[6], P)["routing"])
        assert any((np.array(r["padding_dispatch"]) > 0).any() for r in results[7])
    if P == 4:
        alone = sent(len(cases) - 1, "dispatch")
        assert (alone[~np.eye(P, dtype=bool)] == 0).all() and (np.diag(alone) > 0).all()


def epc_directions():
    from pymoe.expert_parallel import DIRECTIONS

    return DIRECTIONS


def test_local_and_global_load_stats_differ_where_loads_differ():
    """On skewed groups the two statistics give different aux losses and router gradients."""
    case = {"skew": 3.0, "aux_loss_coef": 0.5}
    loc = epc.reference(case, 2)
    glo = epc.reference({**case, "load_stats": "global"}, 2)
    assert loc["aux"] > glo["aux"]  # each group alone is less balanced than the whole batch
    assert not np.allclose(loc["grads"]["w_router"], glo["grads"]["w_router"])
    np.testing.assert_array_equal(loc["y"], glo["y"])  # routing itself does not depend on it


BAD_CASES = [
    ({"E": 3}, "E = 3 experts cannot be split evenly"),
    ({"mismatch_rank": 1}, "parameters differ across ranks: w1"),
    ({"empty_rank": 1}, "T_local = 0"),
    ({"num_experts_on_rank": {"1": 8}}, "settings differ across ranks"),
    ({"overflow_rank": 1, "dtype": "float32"}, "failed on rank 1: ValueError: "),
    # issue 27: unsupported settings refused by name, not an internal error or a wrong result
    ({"layer_kw": {"selection": "experts"}}, "do not support expert choice"),
    ({"layer_kw": {"router_noise": "noisy_topk"}}, "router_noise='noisy_topk'"),
    ({"layer_kw": {"score": "sigmoid"}, "load_stats": "global"}, "load_stats: 'global'"),
    ({"layer_kw_on_rank": {"1": {"num_shared_experts": 1}}}, "settings differ across ranks"),
    ({"extra_param_rank": 1}, "held by only one of them: extra"),  # was a KeyError, a hang
    ({"bias_drift_rank": 1}, "expert_bias differ across ranks"),
    ({"nan_param_rank": 1}, "the experts failed on rank 1: ValueError: params['w1']: expected "
                            "finite values"),
]


@pytest.mark.parametrize("P", [2, 4])
def test_bad_setups_fail_on_every_rank_without_hanging(mpiexec, tmp_path, P):
    cases = [c for c, _ in BAD_CASES] + [{}]  # a good case last: the communicator still works
    proc, results = launch(mpiexec, P, cases, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (case, message), ranks in zip(BAD_CASES, results):
        for r, res in enumerate(ranks):
            assert isinstance(res, str) and res.startswith("ValueError") and message in res, \
                (case, r, res)
    assert all(isinstance(r, dict) for r in results[-1])
    assert all((tmp_path / "out" / f"done_rank{r}").exists() for r in range(P))


def test_uncaught_setup_error_ends_the_job(mpiexec, tmp_path):
    """A script that does not catch the error: every rank stops, mpiexec returns non-zero."""
    proc, _ = launch(mpiexec, 2, [{"E": 3}], tmp_path / "out", "--no-catch")
    assert proc.returncode != 0
    assert "cannot be split evenly" in proc.stderr


def test_everything_dropped_exchange(mpiexec, tmp_path):
    """Zero rows in every direction (routing always keeps C >= 1 rows per chosen expert, so this
    drives the exchange itself): empty messages, zero outputs, zero bytes."""
    proc, results = launch(mpiexec, 4, [{"zero_exchange": True},
                                        {"zero_exchange": True, "exchange": "fixed"}],
                           tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for mode, ranks in zip(("exact", "fixed"), results):
        for res in ranks:
            assert isinstance(res, dict), res
            assert res["filled"].sum() == 0 and not res["out"].any()
            assert res["rows"].sum() == 0
            assert (res["bytes"].sum() == 0) == (mode == "exact")
            assert res["bytes"].sum() == res["padding"].sum()


@pytest.mark.parametrize("P", [1, 4])
def test_example_06_runs_under_mpiexec(mpiexec, tmp_path, P):
    """The example on 4 ranks (and alone, P = 1, without mpiexec): its numbers add up."""
    script = [sys.executable, os.path.join(REPO, "examples", "06_expert_parallel.py"), "--quick",
              "--out", str(tmp_path)] + (["--ranks-per-node", "2", "--max-nodes", "1"] if P == 4
                                         else [])
    env = {**os.environ, "PYTHONPATH": REPO, "MPLBACKEND": "Agg"}
    proc = subprocess.run(([mpiexec, "-n", str(P)] if P > 1 else []) + script, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "06_expert_parallel.json").read_text())
    assert res["P"] == P and len(res["rows"]) == P
    exact, fixed = res["summary"]["exact"], res["summary"]["fixed"]
    assert exact["padding_bytes"] == 0 < fixed["padding_bytes"] < fixed["bytes"]
    assert exact["bytes"] == fixed["bytes"] - fixed["padding_bytes"]  # the same rows travel
    assert (exact["to_other_ranks"] > 0) == (P > 1)
    assert res["sweep_mib"]["fixed"] == res["sweep_mib"]["fixed (formula)"]
    assert all(a < b for a, b in zip(res["sweep_mib"]["exact"], res["sweep_mib"]["fixed"]))
    assert "Rows each rank sends to each rank" in proc.stdout
    from pymoe.viz import have_matplotlib

    if have_matplotlib():
        for name in ("06_bytes_heatmap.png", "06_bytes_vs_capacity.png",
                     "06_inter_node_bytes.png"):
            assert (tmp_path / name).stat().st_size > 10_000
    # nodes (issue 24): at P = 4, 2 nodes of 2; the hierarchical exchange sends the same
    # inter-node bytes as the flat one in fewer messages, dedup never more bytes
    nodes = res["nodes"]
    sweep = nodes["inter_bytes_sweep"]
    assert nodes["max_nodes_sweep"] == list(range(1, P // nodes["ranks_per_node"] + 1))
    assert sweep["flat"] == sweep["hierarchical"] and sweep["flat + dedup"] == \
        sweep["hierarchical + dedup"]
    assert all(d <= f for d, f in zip(sweep["flat + dedup"], sweep["flat"]))
    t = nodes["table"]
    assert (t["hierarchical"]["inter_messages"][0] < t["flat"]["inter_messages"][0]) == (P == 4)
    assert "modelled ms" in proc.stdout and "not a measurement" in proc.stdout


def test_benchmark_runs_and_counts_the_bytes(mpiexec, tmp_path):
    """python -m pymoe.bench.expert_parallel --sizes 1 2: rows per P and mode, bytes that add up
    (its timings are never asserted)."""
    out = tmp_path / "ep.json"
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-m", "pymoe.bench.expert_parallel", "--sizes", "1", "2",
                           "--quick", "--json", str(out), "--markdown", str(tmp_path / "ep.md")],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["P"], r["mode"]) for r in rows] == [(1, "exact"), (1, "fixed"), (2, "exact"),
                                                   (2, "fixed")]
    T, D, _, E, K = 128, 32, 64, 8, 2  # the --quick shape
    C = pymoe.capacity.expert_capacity(T, E, K, 1.25)
    for r in rows:
        if r["mode"] == "fixed":  # 4 exchanges x P ranks x E * C rows of D float32
            assert r["a2a_bytes"] == 4 * r["P"] * E * C * D * 4
        else:
            assert r["padding_bytes"] == 0 and r["a2a_bytes"] <= 4 * r["P"] * K * T * D * 4
        assert r["step_ms"] > 0 and r["alltoallv_alone_gbps"] > 0
    assert "Alltoallv alone" in (tmp_path / "ep.md").read_text()


def test_readme_snippet_runs_on_two_ranks(mpiexec, tmp_path):
    # the usage snippet of docs/expert-parallel.md (README points there), its first python block
    page = open(os.path.join(REPO, "docs", "expert-parallel.md"), encoding="utf-8").read()
    code = page.split("```python\n", 1)[1].split("```", 1)[0]
    script = tmp_path / "snippet.py"
    script.write_text(code)
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, str(script)], capture_output=True,
                          text=True, timeout=TIMEOUT, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # (the two ranks' lines may interleave in the forwarded stdout)
    assert "range(0, 8)" in proc.stdout and "range(8, 16)" in proc.stdout


def test_example_06_without_mpi4py_says_what_to_install():
    """Without mpi4py, example 06 prints one line naming the extra and exits non-zero."""
    script = os.path.join(REPO, "examples", "06_expert_parallel.py")
    hide = ("import runpy, sys; sys.modules['mpi4py'] = None; sys.argv = [sys.argv[1]]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", hide, script], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 1 and proc.stdout == "", proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'pymoe-routing[mpi]'" in lines[0], proc.stderr


# ------------------------------------------------ faults: every rank ends (issue 27, items 1-3)
FAULT_TIMEOUT = 120  # seconds for one launch of many fault cases; a hang fails, not blocks, CI


def _expect_fault(case: dict, ranks: list) -> None:
    """The failing rank re-raises its own exception; every other rank raises PeerFailed naming it
    (or, for an argument error, the same ValueError): nobody is left waiting."""
    f = case["fault"]
    for r, res in enumerate(ranks):
        assert isinstance(res, str), (case, r, res)
        if f["kind"] == "ValueError":
            assert res.startswith("ValueError") and f"injected at {f['at']}" in res, (case, r, res)
        elif r == f["rank"]:
            assert res.startswith(f"{f['kind']}: injected at {f['at']}"), (case, r, res)
        else:
            assert res.startswith("PeerFailed") and f"rank {f['rank']}: {f['kind']}" in res, \
                (case, r, res)


def _fault_launch(mpiexec, P, cases, out):
    out.mkdir(exist_ok=True)
    proc = subprocess.run([mpiexec, "-n", str(P), sys.executable, WORKER, str(out),
                           json.dumps(cases), "--catch-all"], capture_output=True, text=True,
                          timeout=FAULT_TIMEOUT, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all((out / f"done_rank{r}").exists() for r in range(P))
    return launch_results(out, P, len(cases))


def launch_results(out, P, n):
    return [[dict(np.load(out / f"case{i}_rank{r}.npz")) if (out / f"case{i}_rank{r}.npz").exists()
             else (out / f"case{i}_rank{r}.err").read_text() for r in range(P)] for i in range(n)]


@pytest.mark.parametrize("P", [2, 4])
def test_an_exception_of_any_kind_on_one_rank_ends_every_rank(mpiexec, tmp_path, P):
    """Each fault point of a step, each kind of exception, on the last rank (P = 4: also rank 1
    of the "fixed" exchange); a good case after them: the communicator is still in step."""
    kinds = ("MemoryError", "KeyboardInterrupt", "RuntimeError", "ValueError")
    cases = [{"fault": {"rank": P - 1, "at": at, "kind": kinds[i % len(kinds)]},
              "layer_kw": {"num_shared_experts": 1} if i % 3 == 0 else {},
              "exchange": "fixed" if P == 4 else "exact"}
             for i, at in enumerate(epc.FAULT_POINTS)]
    results = _fault_launch(mpiexec, P, cases + [{}], tmp_path / "out")
    for case, ranks in zip(cases, results):
        _expect_fault(case, ranks)
    assert all(isinstance(r, dict) for r in results[-1])


def fault_fuzz_cases(n: int, seed: int) -> list[dict]:
    """n random cases: a random setting, a random rank, point and kind of exception."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        case = {"exchange": str(rng.choice(["exact", "fixed"])),
                "dtype": str(rng.choice(["float32", "float64"])),
                "capacity_factor": float(rng.choice([0.5, 1.0, 2.0])),
                "skew": float(rng.choice([0.0, 2.0])),
                "layer_kw": {"num_shared_experts": int(rng.integers(0, 2))},
                "fault": {"rank": int(rng.integers(0, 2)),
                          "at": str(rng.choice(epc.FAULT_POINTS)),
                          "kind": str(rng.choice(sorted(epc.FAULT_KINDS)))}}
        if rng.random() < 0.3:
            case["load_stats"] = "global"
        cases.append(case)
    return cases


FAULT_FUZZ_CASES = int(os.environ.get("PYMOE_FAULT_FUZZ_CASES", "40"))


def test_fault_fuzz_every_rank_ends_within_the_timeout(mpiexec, tmp_path):
    """The MPI fuzz: FAULT_FUZZ_CASES random (setting, rank, point, kind) under mpiexec -n 2, all
    in one launch with a timeout, a good case after each: every rank ends every case."""
    cases = []
    for c in fault_fuzz_cases(FAULT_FUZZ_CASES, seed=27):
        cases += [c, {}]
    results = _fault_launch(mpiexec, 2, cases, tmp_path / "out")
    for case, ranks in zip(cases, results):
        if "fault" in case:
            _expect_fault(case, ranks)
        else:
            assert all(isinstance(r, dict) for r in ranks), ranks
    print(f"MPI fault fuzz: {FAULT_FUZZ_CASES} fault cases (+ {FAULT_FUZZ_CASES} good ones), "
          "every rank ended each")


UNCAUGHT = """
import sys, time
import numpy as np
from mpi4py import MPI
import pymoe
from pymoe.expert_parallel import ExpertParallelMoE
ep = ExpertParallelMoE(pymoe.MoELayer(4, 4, 4, 2, backend="numpy"))
if MPI.COMM_WORLD.Get_rank() == 1:
    raise RuntimeError("a bug in user code between steps")
MPI.COMM_WORLD.Barrier()  # rank 0 would wait here forever
"""


def test_uncaught_exception_between_steps_ends_the_documented_launch(mpiexec, tmp_path):
    """`mpiexec -n P python script.py` (README, docs/expert-parallel.md): pymoe.expert_parallel's
    excepthook prints the traceback and aborts the job, instead of a hang."""
    script = tmp_path / "uncaught.py"
    script.write_text(UNCAUGHT)
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, str(script)], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env=env)
    assert proc.returncode != 0
    assert "RuntimeError: a bug in user code between steps" in proc.stderr
