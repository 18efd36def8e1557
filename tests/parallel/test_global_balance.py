"""GlobalLoadBalance(comm=...) over MPI: `mpiexec -n 2` ranks with micro-batches of different
sizes; every rank's counts, losses and gradients must equal, bit for bit, one process that is
handed the other rank's counts by a stand-in communicator (the Allreduce of integers is exact,
so nothing depends on the rank order)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from test_expert_parallel import _mpi_setup

import global_balance_worker as w
import pymoe
from helpers import REPO, require_optional
from pymoe.capacity import expert_load
from pymoe.losses import GlobalLoadBalance

P = 2
TIMEOUT = 240  # seconds for the mpiexec launch; a hang fails the test instead of blocking CI


class StandIn:
    """A one-process communicator whose Allreduce adds the other ranks' [E + 1] counts."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step, self.m = rank, step, 0

    def Allreduce(self, send: np.ndarray, recv: np.ndarray) -> None:  # noqa: N802 - mpi4py's name
        recv[:] = send
        for other in range(P):
            if other != self.rank:
                index = pymoe.route(w.micro_batch_logits(other, self.m + self.step * w.MICRO),
                                    w.K, 1.0).expert_index
                recv[:-1] += expert_load(index, w.E)
                recv[-1] += index.shape[0]
        self.m += 1


def expected(rank: int) -> dict:
    out: dict = {}
    for step in range(2):
        g = GlobalLoadBalance(w.E, w.K, comm=StandIn(rank, step))
        for m in range(w.MICRO):
            r = pymoe.route(w.micro_batch_logits(rank, m + step * w.MICRO), w.K, 1.0)
            g.update(r)
            out[f"counts{step}{m}"] = g.tokens_per_expert.copy()
            out[f"tokens{step}{m}"] = np.array(g.num_tokens)
            out[f"loss{step}{m}"] = np.array(g.loss(r))
            out[f"dlogits{step}{m}"] = g.loss_backward(r, 0.5)
    return out


@pytest.fixture(scope="module")
def mpiexec() -> str:
    path, why = _mpi_setup()
    require_optional(path is not None, why)
    return path


def test_two_ranks_count_every_token(mpiexec, tmp_path):
    proc = subprocess.run([mpiexec, "-n", str(P), sys.executable,
                           os.path.join(REPO, "tests", "global_balance_worker.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)
    for rank in range(P):
        err = tmp_path / f"rank{rank}.err"
        assert not err.exists(), err.read_text()
        assert proc.returncode == 0, proc.stderr[-2000:]
        got, want = dict(np.load(tmp_path / f"rank{rank}.npz")), expected(rank)
        assert sorted(got) == sorted(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], f"rank {rank}: {key}")
    got0, got1 = np.load(tmp_path / "rank0.npz"), np.load(tmp_path / "rank1.npz")
    np.testing.assert_array_equal(got0["counts02"], got1["counts02"])  # the same global counts
    # micro-batch m (0..5 over the two steps) has 5 + m tokens on rank 0 and 8 + m on rank 1
    assert int(got0["tokens02"]) == (5 + 6 + 7) + (8 + 9 + 10)
    assert int(got0["tokens12"]) == (8 + 9 + 10) + (11 + 12 + 13)
