"""Worker of tests/parallel/test_global_balance.py, run on P ranks by mpiexec:
every rank routes its own micro-batches (sizes differ across ranks), counts them into a
GlobalLoadBalance over COMM_WORLD, and saves the counts, losses and gradients to
OUT/rank{r}.npz (or the error to OUT/rank{r}.err)."""
from __future__ import annotations

import sys
import traceback

import numpy as np

import pymoe
from pymoe.losses import GlobalLoadBalance

E, K, MICRO = 6, 2, 3


def micro_batch_logits(rank: int, m: int) -> np.ndarray:
    """`[T, E]` logits of micro-batch m on rank r: T = 5 + 3 r + m, skewed differently per rank."""
    rng = np.random.default_rng(100 * rank + m)
    return rng.normal(size=(5 + 3 * rank + m, E)) + np.linspace(0, rank + 1, E)


def run(comm) -> dict:
    g = GlobalLoadBalance(E, K, comm=comm)
    out: dict = {}
    for step in range(2):  # two optimizer steps: reset() between them
        for m in range(MICRO):
            r = pymoe.route(micro_batch_logits(comm.Get_rank(), m + step * MICRO), K, 1.0)
            g.update(r)
            out[f"counts{step}{m}"] = g.tokens_per_expert.copy()
            out[f"tokens{step}{m}"] = np.array(g.num_tokens)
            out[f"loss{step}{m}"] = np.array(g.loss(r))
            out[f"dlogits{step}{m}"] = g.loss_backward(r, 0.5)
        g.reset()
    return out


if __name__ == "__main__":
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    path = sys.argv[1]
    try:
        np.savez(f"{path}/rank{comm.Get_rank()}.npz", **run(comm))
    except Exception:  # noqa: BLE001 - the test reads the traceback
        with open(f"{path}/rank{comm.Get_rank()}.err", "w") as f:
            f.write(traceback.format_exc())
