"""Redundant experts for ExpertParallelMoE: a placement puts copies of hot experts on several ranks.

A placement is phy2log `<int64>[N]` (one layer of pymoe.eplb.rebalance_experts): physical slot i
holds a copy of logical expert phy2log[i], rank r holds slots [r*N/P, (r+1)*N/P), every logical
expert has at least one slot. Replica j of expert e is its j-th slot in slot order
(replica_slots; EPLB's log2phy may number an expert's replicas in another order).

Routing is untouched: every rank routes as without replicas, so the rows that go to logical
expert e are the same. The split rule (deterministic, the same on every rank): expert e's n_e
kept rows of all ranks, taken in rank order (rank 0's rows in slot order, then rank 1's, ...,
the order the one-process layer packs them in), are cut into c_e contiguous chunks of
floor(n_e/c_e) or that + 1 rows: chunk j = rows [floor(j n_e / c_e), floor((j+1) n_e / c_e))
goes to replica j. Every replica then carries
the load EPLB assumed (n_e / c_e, within one row). To know where its rows fall, each rank
needs every rank's counts: one Allgather of `[E + 1]` integers replaces the Alltoall of counts.

Results: each row meets the same expert weights as without replicas, so y and dx are those of
the layer without replicas to rounding, and bit for bit where the expert matmul gives a row the
same bits whatever other rows share the matrix (NumPy's own kernels do; a BLAS may pick another
kernel for another row count). A replicated expert's parameter gradient is the sum of its
chunks' gradients, added in replica order (the chunks' rows in order), and every replica gets
that sum, so replicas that start equal stay equal under any update: the same as the gradient
without replicas up to the order of addition (rounding).
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .experts import EXPERT_PARAMS
from .token_groups import _together


def check_placement(placement: object, num_experts: int, P: int) -> np.ndarray:
    """placement as `<int64>[N]`, checked: N a multiple of P, values in [0, E), each present."""
    if isinstance(placement, (bool, np.bool_)) or not hasattr(placement, "__len__"):
        raise TypeError("placement: expected phy2log, a sequence of logical expert ids [N], got "
                        f"{type(placement).__name__}")
    p = np.asarray(placement)
    if p.ndim != 1 or not np.issubdtype(p.dtype, np.integer):
        raise ValueError(f"placement: expected integers of shape [N], got dtype {p.dtype} shape "
                         f"{p.shape} (pass one layer of eplb.rebalance_experts' phy2log)")
    p = p.astype(np.int64)
    if p.size % P:
        raise ValueError(f"placement: N = {p.size} slots cannot be split evenly over P = {P} "
                         "ranks (N must be a multiple of P)")
    if p.size and (p.min() < 0 or p.max() >= num_experts):
        raise ValueError(f"placement: expert ids must lie in [0, {num_experts}), got "
                         f"[{p.min()}, {p.max()}]")
    missing = np.setdiff1d(np.arange(num_experts), p)
    if missing.size:
        raise ValueError(f"placement: experts {missing.tolist()} have no slot (every expert "
                         "needs at least one)")
    return p


def replica_slots(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """`<int64>[E, R]`: slots[e, j] the slot of replica j of expert e (slot order), -1 past its
    count; R the largest count."""
    cnt = np.bincount(phy2log, minlength=num_experts)
    slots = np.full((num_experts, int(cnt.max())), -1, dtype=np.int64)
    seen = np.zeros(num_experts, dtype=np.int64)
    for i, e in enumerate(phy2log):
        slots[e, seen[e]] = i
        seen[e] += 1
    return slots


def split_rows(counts: np.ndarray, num_replicas: np.ndarray) -> np.ndarray:
    """The split rule (module docstring) for every rank's rows.

    Args:
        counts: `<int64>[P, E]` kept rows rank s sends to logical expert e.
        num_replicas: `<int64>[E]` replicas c_e of each expert.
    Returns:
        m `<int64>[P, E, R]`: rows of rank s that go to replica j of expert e (0 for j >= c_e);
        rank s's rows for e are, in slot order, m[s, e, 0] rows to replica 0, then replica 1's, ...
    """
    P, E = counts.shape
    R = int(num_replicas.max())
    total = counts.sum(axis=0)  # [E]
    j = np.arange(R + 1)
    bounds = (j[None, :] * total[:, None]) // num_replicas[:, None]  # [E, R+1]
    bounds = np.minimum(bounds, total[:, None])  # j > c_e: empty chunks
    start = np.cumsum(counts, axis=0) - counts  # [P, E] first global row of rank s for e
    lo = np.maximum(start[:, :, None], bounds[None, :, :-1])  # [P, E, R]
    hi = np.minimum((start + counts)[:, :, None], bounds[None, :, 1:])
    return np.maximum(hi - lo, 0)


class ReplicaExchange:
    """The "exact" exchange with physical slots as the destinations (module docstring).

    Wraps pymoe.expert_parallel's exchange of this rank (`base`: its communicator, agreement,
    Alltoallv and byte records); this rank's experts are its N/P slots, and packed is
    `[N/P, sum_s C_s, D]`.
    """

    def __init__(self, base: Any, phy2log: np.ndarray, num_experts: int) -> None:
        self.base, self.comm, self.stats = base, base.comm, base.stats
        self.P, self.rank = base.P, base.rank
        self.num_token_groups = base.num_token_groups
        self.El = len(phy2log) // self.P  # slots here
        self.phy2log, self.E = phy2log, num_experts
        self.slots = replica_slots(phy2log, num_experts)  # [E, R]
        self.cnt = np.bincount(phy2log, minlength=num_experts)  # [E]
        # replica index of each slot: slot i is replica rep[i] of expert phy2log[i]
        self.rep = np.empty(len(phy2log), dtype=np.int64)
        for e in range(num_experts):
            c = self.cnt[e]
            self.rep[self.slots[e, :c]] = np.arange(c)

    @property
    def directions(self) -> Iterator[str]:  # the base records the exchanges, in this order
        return self.base.directions

    @directions.setter
    def directions(self, it: Iterator[str]) -> None:
        self.base.directions = it

    def agree(self, step: str, problem: str | None, fatal: bool = False) -> None:
        self.base.agree(step, problem, fatal)

    def sum_in_group_order(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        return self.base.sum_in_group_order(parts)

    def _mpi_time(self, t0: float) -> None:
        self.base._mpi_time(t0)

    def _alltoallv(self, *args: Any) -> None:
        self.base._alltoallv(*args)

    def _record(self, *args: Any) -> None:
        self.base._record(*args)

    def set_loads(self, loads: Sequence[np.ndarray], capacities: Sequence[int]) -> None:
        P, rank, Nl = self.P, self.rank, self.El
        self.n = np.asarray(loads[0], dtype=np.int64)  # [E] rows I send per logical expert
        self.C = int(capacities[0])
        mine = np.concatenate([self.n, [self.C]]).astype(np.int64)
        every = np.empty((P, self.E + 1), dtype=np.int64)
        t0 = time.perf_counter()
        self.comm.Allgather(mine, every)
        self._mpi_time(t0)
        self.stats.control_bytes += mine.nbytes * P
        counts, self.recv_C = every[:, :self.E], every[:, self.E]  # [P, E], [P]
        self.m = split_rows(counts, self.cnt)  # [P, E, R]
        here = np.arange(rank * Nl, (rank + 1) * Nl)  # my slots
        # [P, Nl] rows source s sends to my local slot i
        self.recv_n = self.m[:, self.phy2log[here], self.rep[here]]
        # [N] rows I send to each slot, and where in my expert block they start
        self.send_slot = self.m[rank, self.phy2log, self.rep]
        off = np.cumsum(self.m[rank], axis=1) - self.m[rank]  # [E, R]
        self.send_off = off[self.phy2log, self.rep]  # [N]
        self.send_rows = self.send_slot.reshape(P, Nl).sum(axis=1)  # [P]
        self.recv_rows = self.recv_n.sum(axis=1)  # [P]
        self.start = np.cumsum(self.recv_n, axis=0) - self.recv_n  # [P, Nl] into packed

    def to_experts(self, blocks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        blk = blocks[0]  # [E, C, D] by logical expert
        D, row = blk.shape[2], blk.shape[2] * blk.itemsize
        parts = [blk[e, a:a + k] for e, a, k in zip(self.phy2log, self.send_off, self.send_slot)]
        send = np.concatenate(parts) if parts else np.empty((0, D), blk.dtype)  # by slot
        recv = np.empty((int(self.recv_rows.sum()), D), dtype=blk.dtype)
        self._alltoallv(np.ascontiguousarray(send), self.send_rows * row, recv,
                        self.recv_rows * row)
        packed = np.zeros((self.El, int(self.recv_C.sum()), D), dtype=blk.dtype)
        pos = 0
        for s in range(self.P):
            for i in range(self.El):
                k, a = self.recv_n[s, i], self.start[s, i]
                packed[i, a:a + k] = recv[pos:pos + k]
                pos += k
        self._record(self.send_rows, self.send_rows * row, np.zeros(self.P))
        return packed, self.recv_n.sum(axis=0)

    def from_experts(self, packed: np.ndarray) -> list[np.ndarray]:
        D, row = packed.shape[2], packed.shape[2] * packed.itemsize
        parts = [packed[i, self.start[s, i]:self.start[s, i] + self.recv_n[s, i]]
                 for s in range(self.P) for i in range(self.El)]
        send = np.concatenate(parts) if parts else np.empty((0, D), packed.dtype)
        recv = np.empty((int(self.send_rows.sum()), D), dtype=packed.dtype)
        self._alltoallv(np.ascontiguousarray(send), self.recv_rows * row, recv,
                        self.send_rows * row)
        out = np.zeros((self.E, self.C, D), dtype=packed.dtype)
        pos = 0
        for e, a, k in zip(self.phy2log, self.send_off, self.send_slot):  # slot order, as sent
            out[e, a:a + k] = recv[pos:pos + k]
            pos += k
        self._record(self.recv_rows, self.recv_rows * row, np.zeros(self.P))
        return [out]


def replicated_parts(grads: dict[str, np.ndarray], phy2log: np.ndarray, rank: int
                     ) -> dict[int, list[np.ndarray]]:
    """This rank's gradients of slots whose expert has several replicas: {slot: [w1, b1, w2,
    b2 gradients]} (what sum_replica_grads sends)."""
    Nl = len(grads["w1"])
    cnt = np.bincount(phy2log)
    return {rank * Nl + i: [grads[n][i] for n in EXPERT_PARAMS]
            for i in range(Nl) if cnt[phy2log[rank * Nl + i]] > 1}


def sum_replica_grads(ex: ReplicaExchange, grads: dict[str, np.ndarray]) -> None:
    """Collective: every replica's expert gradients become the sum over the expert's replicas,
    added in replica order (in place). A failure in the local part ends every rank."""
    mine = _together(ex, "the replicas' gradient sum",
                     lambda: replicated_parts(grads, ex.phy2log, ex.rank))
    t0 = time.perf_counter()
    every = ex.comm.allgather(mine)
    ex._mpi_time(t0)
    ex.stats.control_bytes += sum(a.nbytes for a_list in mine.values() for a in a_list) * ex.P
    by_slot = {s: g for part in every for s, g in part.items()}
    Nl = ex.El
    for i in range(Nl):
        slot = ex.rank * Nl + i
        e = ex.phy2log[slot]
        if ex.cnt[e] < 2:
            continue
        for k, n in enumerate(EXPERT_PARAMS):
            total = np.array(by_slot[ex.slots[e, 0]][k], copy=True)
            for j in range(1, ex.cnt[e]):
                total += by_slot[ex.slots[e, j]][k]
            grads[n][i] = total
