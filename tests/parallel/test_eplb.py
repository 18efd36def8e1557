"""pymoe.eplb against deepseek-ai/EPLB's eplb.py.

The literal cases were computed by running eplb.py itself (deepseek-ai/EPLB commit d52c72d, the
newest, whose global policy packs replicas onto GPUs, from e1100fe) with torch 2.13 on CPU, and
pasted here: facts, not code. Every sort in them has at most 16 items, where torch's CPU sort
keeps equal loads in index order as pymoe's stable sort does. All outputs are integers, so the
comparisons are exact.
"""
from __future__ import annotations

import numpy as np
import pytest

from pymoe import eplb

README_W = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
            [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]

# (weight, num_replicas, num_groups, num_nodes, num_gpus) -> (phy2log, log2phy, logcnt) of eplb.py
CASES = {
    "readme_hierarchical": (
        (README_W, 16, 4, 2, 8),
        [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
         [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]],
        [[[12, -1], [15, 13], [11, -1], [6, -1], [7, 5], [0, 2], [1, -1], [3, -1], [4, -1],
          [9, -1], [8, 10], [14, -1]],
         [[13, -1], [15, 11], [8, -1], [14, -1], [9, -1], [10, 12], [2, 4], [0, -1], [6, 3],
          [7, -1], [1, -1], [5, -1]]],
        [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]),
    "readme_global": (  # 3 groups on 2 nodes: the global policy, replicas packed onto 4 GPUs
        (README_W, 16, 3, 2, 4),
        [[10, 8, 3, 7, 10, 1, 1, 4, 0, 5, 4, 2, 11, 5, 9, 6],
         [1, 9, 3, 11, 2, 8, 8, 10, 5, 6, 7, 0, 5, 6, 7, 4]],
        [[[8, -1], [5, 6], [11, -1], [2, -1], [10, 7], [13, 9], [15, -1], [3, -1], [1, -1],
          [14, -1], [0, 4], [12, -1]],
         [[11, -1], [0, -1], [4, -1], [2, -1], [15, -1], [8, 12], [9, 13], [10, 14], [5, 6],
          [1, -1], [7, -1], [3, -1]]],
        [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 1, 1, 1, 1, 2, 2, 2, 2, 1, 1, 1]]),
    "ties": (  # equal loads everywhere: index order decides (stable sort, first maximum)
        ([[5, 5, 5, 5, 1, 1, 1, 1], [8, 0, 8, 0, 8, 0, 8, 0]], 12, 2, 2, 4),
        [[2, 0, 0, 3, 1, 1, 6, 4, 4, 7, 5, 5], [0, 0, 1, 2, 2, 3, 4, 4, 5, 6, 6, 7]],
        [[[1, 2], [4, 5], [0, -1], [3, -1], [7, 8], [10, 11], [6, -1], [9, -1]],
         [[0, 1], [2, -1], [3, 4], [5, -1], [6, 7], [8, -1], [9, 10], [11, -1]]],
        [[2, 2, 1, 1, 2, 2, 1, 1], [2, 1, 2, 1, 2, 1, 2, 1]]),
    "hierarchical_3_layers": (
        ([[38, 33, 75, 40, 78, 57, 12, 50, 40, 56, 57, 56, 57, 87, 33, 8],
          [68, 74, 45, 82, 28, 71, 65, 40, 78, 94, 26, 3, 61, 80, 10, 60],
          [71, 4, 62, 33, 12, 37, 55, 17, 30, 64, 5, 43, 84, 71, 88, 37]], 24, 4, 2, 4),
        [[11, 8, 10, 10, 9, 15, 13, 13, 14, 12, 12, 9, 3, 0, 2, 1, 7, 6, 4, 4, 2, 5, 5, 7],
         [0, 2, 3, 8, 1, 11, 9, 9, 3, 8, 1, 10, 15, 13, 5, 6, 12, 14, 13, 7, 5, 6, 12, 4],
         [14, 12, 15, 13, 6, 7, 14, 12, 5, 13, 6, 4, 0, 3, 2, 2, 11, 1, 0, 9, 9, 8, 11, 10]],
        [[[13, -1], [15, -1], [14, 20], [12, -1], [18, 19], [21, 22], [17, -1], [16, 23],
          [1, -1], [4, 11], [2, 3], [0, -1], [9, 10], [6, 7], [8, -1], [5, -1]],
         [[0, -1], [10, 4], [1, -1], [8, 2], [23, -1], [20, 14], [21, 15], [19, -1], [9, 3],
          [6, 7], [11, -1], [5, -1], [22, 16], [18, 13], [17, -1], [12, -1]],
         [[12, 18], [17, -1], [14, 15], [13, -1], [11, -1], [8, -1], [4, 10], [5, -1],
          [21, -1], [19, 20], [23, -1], [22, 16], [1, 7], [3, 9], [0, 6], [2, -1]]],
        [[1, 1, 2, 1, 2, 2, 1, 2, 1, 2, 2, 1, 2, 2, 1, 1],
         [1, 2, 1, 2, 1, 2, 2, 1, 2, 2, 1, 1, 2, 2, 1, 1],
         [2, 1, 2, 1, 1, 1, 2, 1, 1, 2, 1, 2, 2, 2, 2, 1]]),
    "hot_expert_and_idle_layer": (  # log2phy's last size is the largest count over layers (9);
        # the all-zero layer gives every redundant replica to expert 0 (the first maximum)
        ([[400, 10, 10, 10, 10, 10, 10, 10], [0] * 8], 16, 1, 1, 4),
        [[0, 0, 0, 7, 0, 0, 1, 4, 0, 0, 2, 5, 0, 0, 3, 6],
         [0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 0, 0, 0, 0, 0, 0]],
        [[[0, 4, 8, 12, 1, 5, 9, 13, 2]] + [[p] + [-1] * 8 for p in (6, 10, 14, 7, 11, 15, 3)],
         [[0, 8, 9, 10, 11, 12, 13, 14, 15]] + [[p] + [-1] * 8 for p in range(1, 8)]],
        [[9, 1, 1, 1, 1, 1, 1, 1], [9, 1, 1, 1, 1, 1, 1, 1]]),
    "float32_near_tie": (  # after 1.0 | 0.75 + 0.2499999851 the packs tie in float32 (eplb.py's
        # arithmetic) but not in float64, where a float64 port gives [[0, 4, 5, 1, 2, 3]]
        ([[1.0, 0.75, 0.25 - 2 ** -26, 0.1, 0.05, 0.01]], 6, 1, 1, 2),
        [[0, 3, 5, 1, 2, 4]], [[[0], [3], [4], [1], [5], [2]]], [[1, 1, 1, 1, 1, 1]]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_equals_eplb_py(name):
    args, phy2log, log2phy, logcnt = CASES[name]
    got = eplb.rebalance_experts(np.asarray(args[0]), *args[1:])
    for g, want in zip(got, (phy2log, log2phy, logcnt)):
        assert g.dtype == np.int64
        np.testing.assert_array_equal(g, np.asarray(want))


def test_balanced_packing_and_replicate_literals():
    # eplb.py on float64 tensors adds pack totals in float64: the near tie then goes the other way
    w = np.array([[1.0, 0.75, 0.25 - 2 ** -26, 0.1, 0.05, 0.01]])
    pack, rank = eplb.balanced_packing(w, 2)
    np.testing.assert_array_equal(pack, [[0, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(rank, [[0, 0, 1, 2, 1, 2]])
    pack, rank = eplb.balanced_packing(w.astype(np.float32), 2)
    np.testing.assert_array_equal(pack, [[0, 1, 1, 0, 1, 0]])
    np.testing.assert_array_equal(rank, [[0, 0, 1, 1, 2, 2]])
    phy2log, rank, cnt = eplb.replicate_experts(np.array([[6, 2, 3]]), 6)  # 6, 3, 3, 2, ... ties
    np.testing.assert_array_equal(phy2log, [[0, 1, 2, 0, 0, 2]])
    np.testing.assert_array_equal(rank, [[0, 0, 0, 1, 2, 1]])
    np.testing.assert_array_equal(cnt, [[3, 1, 2]])


def _draws(n: int, seed: int = 0):
    """Fixed skewed (Zipf) integer loads and valid sizes, both policies."""
    rng = np.random.default_rng(seed)
    while n:
        E, gpus, nodes = (int(rng.choice(c)) for c in ([8, 16, 32], [2, 4, 8], [1, 2]))
        G = int(rng.choice([1, 2, 4, 8]))
        N = E + gpus * int(rng.integers(0, 3))
        if gpus % nodes or E % G or N % gpus or E % gpus:
            continue
        n -= 1
        w = rng.zipf(1.5, (2, E)).clip(max=50) * rng.integers(1, 100, (2, E))
        yield w, N, G, nodes, gpus


def test_properties():
    for w, N, G, nodes, gpus in _draws(150):
        phy2log, log2phy, logcnt = eplb.rebalance_experts(w, N, G, nodes, gpus)
        L, E = w.shape
        assert phy2log.shape == (L, N) and logcnt.shape == (L, E)
        for i in range(L):  # every expert has a replica; the counts and both maps agree
            np.testing.assert_array_equal(np.bincount(phy2log[i], minlength=E), logcnt[i])
            assert logcnt[i].min() >= 1
            for e in range(E):
                slots = log2phy[i, e]
                assert (slots[logcnt[i, e]:] == -1).all()
                assert (phy2log[i, slots[:logcnt[i, e]]] == e).all()
        assert log2phy.shape[2] == logcnt.max()
        # the hierarchical policy keeps each group's experts on one node
        if G % nodes == 0:
            node_of_slot = np.arange(N) // (N // nodes)
            for i in range(L):
                for g in range(G):
                    grp = np.isin(phy2log[i], np.arange(g * E // G, (g + 1) * E // G))
                    assert len(set(node_of_slot[grp])) == 1


def test_max_gpu_load_no_worse_than_without_replication():
    """On skewed loads: the hottest GPU with EPLB's replicas carries no more than with the plain
    placement (experts [g*E/P, (g+1)*E/P) on GPU g, no replica). A greedy heuristic, not a
    theorem: a search over 4000 similar draws found 10 that break it, each where the plain
    placement already balanced well (hottest GPU <= 1.26 x the mean), by at most 0.07 x the mean;
    this fixed set of 150 holds none. The replica loads, which replicate_experts minimises,
    shrink with every added replica (a theorem)."""
    for w, N, G, nodes, gpus in _draws(150):
        phy2log, _, _ = eplb.rebalance_experts(w, N, G, nodes, gpus)
        plain = eplb.gpu_loads(w, np.arange(w.shape[1])[None], gpus).max(axis=1)
        assert (eplb.gpu_loads(w, phy2log, gpus).max(axis=1) <= plain).all()
        _, _, cnt = eplb.replicate_experts(w, N)
        _, _, cnt_more = eplb.replicate_experts(w, N + 1)
        assert ((w / cnt_more).max(axis=1) <= (w / cnt).max(axis=1)).all()


@pytest.mark.parametrize("args, name", [
    ((README_W, 15, 4, 2, 8), "num_replicas"),  # not a multiple of num_gpus
    ((README_W, 16, 4, 3, 8), "num_gpus"),  # not a multiple of num_nodes
    ((README_W, 8, 4, 2, 8), "num_replicas"),  # fewer replicas than experts
    ((README_W, 16, 5, 5, 10), "num_replicas"),
    ((README_W, 16, 8, 2, 8), "num_groups"),  # 12 experts in 8 groups
    (([[1, -2, 3, 4]], 4, 1, 1, 2), "weight"),
    (([[1.0, np.nan, 3, 4]], 4, 1, 1, 2), "weight"),
    (([[1.0, np.inf, 3, 4]], 4, 1, 1, 2), "weight"),
    (([[[1, 2]]], 4, 1, 1, 2), "weight"),
    ((README_W, 16, 4, 0, 8), "num_nodes"),
    ((np.zeros((1, 0)), 4, 1, 1, 2), "weight"),
])
def test_bad_input(args, name):
    with pytest.raises(ValueError, match=name):
        eplb.rebalance_experts(np.asarray(args[0]), *args[1:])


def test_bad_input_helpers():
    with pytest.raises(ValueError, match="num_packs"):
        eplb.balanced_packing(np.ones((1, 6)), 4)
    with pytest.raises(ValueError, match="num_phy"):
        eplb.replicate_experts(np.ones((1, 6)), 5)
    with pytest.raises(ValueError, match="weight"):
        eplb.replicate_experts(np.array([[1.0, np.nan]]), 3)
    with pytest.raises(TypeError, match="num_replicas"):
        eplb.rebalance_experts(np.ones((1, 4)), 4.0, 1, 1, 2)


def test_rank_load_bars_text(monkeypatch):
    from pymoe import viz

    monkeypatch.setenv("PYMOE_VIZ_TEXT", "1")
    text = viz.rank_load_bars({"before": [6, 2, 0, 0], "after": [2, 2, 2, 2]}, "unused.png",
                              title="t")
    assert "before: max / mean = 3.00" in text and "after: max / mean = 1.00" in text
    assert "rank 0  " + "#" * 50 + " 6" in text


def test_docs_snippet_runs():
    """docs/eplb.md's first code block: EPLB's README example, with eplb.py's output."""
    import contextlib
    import io
    import os
    import re

    from helpers import REPO

    text = open(os.path.join(REPO, "docs", "eplb.md"), encoding="utf-8").read()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    env: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, "docs/eplb.md", "exec"), env)
    np.testing.assert_array_equal(env["phy2log"], CASES["readme_hierarchical"][1])
