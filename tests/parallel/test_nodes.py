"""Experts across nodes (pymoe.ep_nodes, issue 24): the hierarchical all-to-all, the per-node
deduplicated dispatch and node-limited routing under mpiexec, bit for bit against the one-process
layer, with the intra-/inter-node accounting checked against the routing; and, in one process,
the split, the cost model and the scale arithmetic on hand-checkable numbers."""
from __future__ import annotations

import numpy as np
import pytest
from test_expert_parallel import _expect_fault, _fault_launch, launch, mpiexec  # noqa: F401

import expert_parallel_cases as epc
from pymoe import ep_nodes
from pymoe.expert_parallel import DIRECTIONS


def node_cases(P: int) -> list[dict]:
    """Every (exchange, dedup, R) of the issue at this P; node-limited routing where P/R > 1."""
    cases = []
    for R in (1, 2):
        N = P // R
        limited = {"E": 8, "K": 3, "max_nodes": max(1, N // 2),
                   "layer_kw": {"num_groups": N, "topk_groups": max(1, N // 2)}}
        cases += [
            {"exchange": "exact", "ranks_per_node": R},  # flat: the reference for the bytes
            {"exchange": "hierarchical", "ranks_per_node": R},
            {"exchange": "hierarchical", "ranks_per_node": R, "dedup": True, "E": 8, "K": 3,
             "skew": 2.0, "capacity_factor": 0.75, "dtype": "float32"},
            {"exchange": "exact", "ranks_per_node": R, "dedup": True, "E": 8, "K": 3},
            {"exchange": "hierarchical", "ranks_per_node": R, "dedup": True, **limited},
            {"exchange": "exact", "ranks_per_node": R, "dedup": True, "load_stats": "global",
             "capacity_factor": None, **limited},
        ]
    rng = np.random.default_rng(24 + P)  # a few random settings on top
    for _ in range(4):
        R = int(rng.choice([r for r in (1, 2, 4) if P % r == 0]))
        E, K = int(rng.choice([8, 16])), int(rng.integers(1, 4))
        case = {"exchange": str(rng.choice(["exact", "hierarchical"])), "ranks_per_node": R,
                "dedup": bool(rng.integers(0, 2)), "E": E, "K": K,
                "capacity_factor": float(rng.choice([0.5, 1.0, 2.0])),
                "skew": float(rng.choice([0.0, 2.0])), "seed": int(rng.integers(0, 99)),
                "dtype": str(rng.choice(["float32", "float64"]))}
        M = int(rng.integers(1, P // R + 1))
        if M * E // (P // R) >= K:  # enough experts on M nodes for K choices
            case.update(max_nodes=M, layer_kw={"num_groups": P // R, "topk_groups": M})
        cases.append(case)
    cases.append({"exchange": "fixed", "ranks_per_node": min(2, P)})  # flat accounting, padded
    return cases


def _routing_deliveries(case: dict, P: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(final rank, token) of every kept slot rank `rank` sends in the dispatch."""
    r = epc.reference(case, P)["routing"][rank]
    E, K = epc.full(case)["E"], epc.full(case)["K"]
    e, c = np.nonzero(np.arange(r.capacity)[None, :] < r.expert_load_kept[:, None])
    return e // (E // P), r.slot_owner[e, c] // K


@pytest.mark.parametrize("P", [2, 4])
def test_node_modes_match_one_process_and_count_the_links(mpiexec, tmp_path, P):  # noqa: F811
    cases = node_cases(P)
    bad = [{"ranks_per_node": 3}, {"exchange": "fixed", "dedup": True},
           {"max_nodes": 1, "ranks_per_node": 1}]  # a layer not routed node-limited
    proc, results = launch(mpiexec, P, cases + bad, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case, ranks in zip(cases, results):
        assert all(isinstance(r, dict) for r in ranks), (case, ranks)
        assert epc.mismatches(case, ranks) == [], case
    for (case, want), ranks in zip(zip(bad, ("ranks_per_node: 3 ranks per node do not divide",
                                             "dedup: the fixed exchange", "max_nodes: 1 needs")),
                                   results[len(cases):]):
        assert all(isinstance(r, str) and r.startswith("ValueError") and want in r
                   for r in ranks), (case, ranks)

    fewer = []  # dedup cases whose dispatch sends fewer rows across nodes
    for case, ranks in zip(cases, results):
        R = case["ranks_per_node"]
        node = np.arange(P) // R
        split = ep_nodes.node_split({k: np.array([[r[f"wire_{k}_{d}"] for r in ranks]
                                                  for d in DIRECTIONS]) for k in
                                     ep_nodes.SPLIT_KEYS}, R)
        logical = np.array([[r[f"rows_{d}"] for r in ranks] for d in DIRECTIONS])  # [4, P, P]
        remote = node[:, None] != node[None, :]
        inter_rows = (logical * remote).sum(axis=(1, 2))  # what crosses nodes, row per slot
        for r, res in enumerate(ranks):  # nothing on a link to oneself; bytes = rows x row size
            for d in DIRECTIONS:
                assert res[f"wire_rows_{d}"][r] == 0 == res[f"wire_messages_{d}"][r]
        if case.get("max_nodes"):  # node-limited: each token's experts on <= M nodes
            E, M = epc.full(case)["E"], case["max_nodes"]
            for rt in epc.reference(case, P)["routing"]:
                nodes = rt.expert_index // (E // (P // R))
                assert max(len(set(t)) for t in nodes.tolist()) <= M
        if case["exchange"] == "fixed":  # the wire is the flat exchange's, padding included
            for r, res in enumerate(ranks):
                want_b = res["bytes_dispatch"] * (np.arange(P) != r)
                np.testing.assert_array_equal(res["wire_bytes_dispatch"], want_b)
            continue
        if not case.get("dedup"):
            # flat or hierarchical: the same rows cross nodes; the hierarchical exchange in at
            # most N - 1 inter-node messages per rank and exchange, the flat one in up to P - R
            np.testing.assert_array_equal(split["inter"]["rows"], inter_rows)
            limit = P // R - 1 if case["exchange"] == "hierarchical" else P - R
            assert (split["per_rank"]["inter_messages"] <= limit).all()
            continue
        # dedup: the dispatch sends each token once per remote node (counted from the routing)
        # and the other three exchanges one row per slot, as without it
        want = 0
        for r in range(P):
            final, token = _routing_deliveries(case, P, r)
            far = node[final] != node[r]
            want += len(set(zip(token[far].tolist(), node[final][far].tolist())))
        assert split["inter"]["rows"][0] == want <= inter_rows[0]
        fewer.append(want < inter_rows[0])
        np.testing.assert_array_equal(split["inter"]["rows"][1:], inter_rows[1:])
        assert sum(int(r["meta_bytes"]) for r in ranks) > 0  # the deliveries travel too
    if P == 4:  # the cases show the point: at R = 2 fewer inter-node messages, fewer rows
        assert len([c for c in cases if c["ranks_per_node"] == 4]) >= 1  # one node: all intra
        flat, hier = results[6], results[7]  # exact and hierarchical at R = 2, same routing
        def msgs(rs):
            return sum(int(r[f"wire_messages_{d}"][2:].sum()) for r in rs[:2] for d in DIRECTIONS)
        assert msgs(hier) < msgs(flat)
        assert any(fewer)


def test_faults_end_every_rank_in_the_hierarchical_and_dedup_modes(mpiexec, tmp_path):  # noqa: F811
    """mpiexec -n 4, two nodes of two ranks: an exception at each point of a step on one rank."""
    kinds = ("MemoryError", "KeyboardInterrupt", "RuntimeError", "ValueError")
    cases = [{"fault": {"rank": (1, 3)[i % 2], "at": at, "kind": kinds[i % len(kinds)]},
              "exchange": "hierarchical", "ranks_per_node": 2, "dedup": i % 3 == 0,
              "E": 8, "K": 3}
             for i, at in enumerate(epc.FAULT_POINTS)]
    results = _fault_launch(mpiexec, 4, cases + [{"exchange": "hierarchical",
                                                  "ranks_per_node": 2}], tmp_path / "out")
    for case, ranks in zip(cases, results):
        _expect_fault(case, ranks)
    assert all(isinstance(r, dict) for r in results[-1])


# ------------------------------------------------------------------------ one process
def test_node_split_and_the_cost_model_by_hand():
    """P = 4, R = 2: rank 0 sends 3 rows (30 bytes) to rank 1 (its node) and 5 (50 bytes) to
    rank 2 (the other node), in the dispatch only."""
    wire = {k: np.zeros((4, 4, 4), np.int64) for k in ep_nodes.SPLIT_KEYS}
    wire["rows"][0, 0, 1], wire["rows"][0, 0, 2] = 3, 5
    wire["bytes"][0, 0, 1], wire["bytes"][0, 0, 2] = 30, 50
    wire["messages"][0, 0, 1] = wire["messages"][0, 0, 2] = 1
    s = ep_nodes.node_split(wire, 2)
    assert s["intra"]["rows"].tolist() == [3, 0, 0, 0] and s["inter"]["bytes"].tolist()[0] == 50
    links = ep_nodes.Links(intra_bandwidth=10.0, inter_bandwidth=5.0, intra_latency=1.0,
                           inter_latency=2.0)
    # 30 / 10 + 1 * 1 + 50 / 5 + 1 * 2 = 16 seconds for the dispatch, nothing else
    assert ep_nodes.modelled_seconds(s, links).tolist() == [16.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="ranks_per_node: 3 ranks per node"):
        ep_nodes.check_ranks_per_node(3, 4)
    with pytest.raises(ValueError, match="max_nodes"):
        ep_nodes.node_limited_routing(8, 2, 5)
    assert ep_nodes.node_limited_routing(8, 2, 2) == {"num_groups": 4, "topk_groups": 2}


def test_hops_reach_the_final_rank():
    """Every plan delivers every (source, destination) pair, inter-node hops only on lanes."""
    P, R = 8, 4
    for plan in (ep_nodes.stage_plan("hierarchical", False), ep_nodes.stage_plan("exact", True)):
        for here0 in range(P):
            final = np.arange(P)
            here = np.full(P, here0)
            for s, kind in enumerate(plan):
                nh = np.array([ep_nodes.next_hop(s, plan, int(h), final[i:i + 1], final[i:i + 1] % R,
                                                 R)[0] for i, h in enumerate(here)])
                if kind == "node":
                    assert (nh // R == here // R).all()
                else:
                    assert (nh % R == here % R).all()
                here = nh
            assert (here == final).all()


def test_inter_node_arithmetic_small_case_by_hand():
    """N = 2 nodes of 1 GPU, K = 2, M = 1, T = 4 tokens, D = 3, 2 bytes: a choice is remote with
    probability 1/2: 4 * 2 / 2 = 4 rows per exchange without dedup, 4 * 1 / 2 = 2 with it."""
    a = ep_nodes.inter_node_arithmetic(num_experts=4, k=2, num_nodes=2, gpus_per_node=1,
                                       max_nodes=1, d_model=3, itemsize=2, tokens_per_gpu=4)
    assert a["rows_per_gpu_exchange"] == {"none": 4.0, "dedup": 2.0}
    assert a["per_gpu_bytes"] == {"none": 4 * 4 * 6, "dedup_dispatch": 2 * 6 + 3 * 4 * 6,
                                  "dedup_all": 4 * 2 * 6}
    assert a["messages_per_gpu_exchange"] == {"flat": 1, "hierarchical": 1}
    v3 = ep_nodes.inter_node_arithmetic()  # DeepSeek-V3's shape: 7/8 of 4096 x 8 rows per GPU
    assert v3["rows_per_gpu_exchange"]["none"] == 4096 * 8 * 7 / 8
    assert v3["messages_per_gpu_exchange"] == {"flat": 56, "hierarchical": 7}
    with pytest.raises(ValueError, match="max_nodes"):
        ep_nodes.inter_node_arithmetic(max_nodes=9)


def test_the_arithmetic_command_prints_deepseek_v3(capsys):
    """`python -m pymoe.ep_nodes` (docs/expert-parallel.md): DeepSeek-V3's shape by default."""
    ep_nodes._main([])
    out = capsys.readouterr().out
    assert "Arithmetic, not a measurement" in out and "flat 56, hierarchical 7" in out
    assert "105.23 GB all GPUs" in out  # 4 x 64 x 4096 x 8 x 7/8 x 7168 x 2 bytes


def test_the_nodes_snippet_of_the_docs_runs_on_four_ranks(mpiexec, tmp_path):  # noqa: F811
    """docs/expert-parallel.md's node snippet (its second python block) under mpiexec -n 4."""
    import os
    import subprocess
    import sys

    from helpers import REPO

    page = open(os.path.join(REPO, "docs", "expert-parallel.md"), encoding="utf-8").read()
    code = page.split("```python\n")[2].split("```", 1)[0]
    script = tmp_path / "nodes.py"
    script.write_text(code)
    proc = subprocess.run([mpiexec, "-n", "4", sys.executable, str(script)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "inter-node rows per exchange" in proc.stdout
