"""Padding masks under expert parallelism: each rank passes its part of the mask (split like
x); every rank's y, dx and gradients equal MoELayer(token_groups=P) on the whole batch and
mask bit for bit, for each padding mode, local and global load statistics, a rank of padding
only, and random priority (each rank's routing draws for its real tokens only)."""
from __future__ import annotations

import numpy as np
import pytest
from test_expert_parallel import launch, mpiexec  # noqa: F401  (the fixture)

import expert_parallel_cases as epc

CASES = [
    {"pad": 0.3},
    {"pad": 0.3, "load_stats": "global"},
    {"pad": 0.3, "layer_kw": {"padding": "routed"}},
    {"pad": 0.3, "layer_kw": {"padding": "counted"}, "load_stats": "global"},
    {"pad": 0.3, "all_pad_rank": 1, "priority": "random"},
    {"pad": 0.4, "all_pad_rank": 0, "load_stats": "global",
     "layer_kw": {"num_shared_experts": 1}},
]


@pytest.mark.parametrize("P", [2, 4])
def test_masked_ranks_match_one_process_bit_for_bit(mpiexec, tmp_path, P):  # noqa: F811
    proc, results = launch(mpiexec, P, CASES, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case, ranks in zip(CASES, results):
        assert all(isinstance(r, dict) for r in ranks), (case, ranks)
        assert epc.mismatches(case, ranks) == [], case
        m = epc.token_mask(case, P)
        T = epc.full(case)["T_local"]
        routed = case.get("layer_kw", {}).get("padding") == "routed"
        for r, res in enumerate(ranks):
            pad = ~m[r * T:(r + 1) * T]
            assert not np.asarray(res["dx"])[pad].any()
            assert (np.abs(np.asarray(res["y"])[pad]).max(initial=0) > 0) == (routed and pad.any())


def test_mask_on_some_ranks_only_is_refused_everywhere(mpiexec, tmp_path):  # noqa: F811
    """A mask on rank 0 only: every rank raises the same ValueError, nobody hangs."""
    proc, results = launch(mpiexec, 2, [{"pad": 0.3, "mask_rank_only": 0}], tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for res in results[0]:
        assert isinstance(res, str) and "token_mask: passed on ranks [0] only" in res, res
