"""Expert parallelism over MPI: P ranks, E/P experts on each, one token group per rank.

Every rank holds a replica of the router and experts [r*E/P, (r+1)*E/P) of a MoELayer, and routes
its own T_local tokens with its own capacity (the GShard group). One step:

    forward   route locally -> Alltoall of per-expert row counts -> Alltoallv of the kept rows to
              the ranks that own their experts ("dispatch") -> local experts -> Alltoallv of the
              outputs back ("combine") -> combine with the gates
    backward  the same exchanges in reverse: gate * dy rows to the experts ("grad_dispatch"), the
              experts' input gradients back ("grad_combine"); expert parameter gradients stay on
              their rank; router gradients are averaged over the ranks (Allgather, then a sum in
              rank order: exact, the same bits for any P, where a ring Allreduce's order depends on P)

Two exchange modes move the same rows and give the same results, with different bytes:
    "exact"  only the kept rows travel (Megatron-Core's all-to-all token dispatcher);
    "fixed"  every rank sends its whole `[E/P, C, D]` capacity buffer to every rank, padding
             included (GShard, DeepSpeed, Tutel): static sizes, paid for in padding bytes.
    "hierarchical"  the exact rows, over nodes (pymoe.ep_nodes): regrouped inside each node,
             exchanged between nodes among the ranks with the same local index, scattered
             inside the node (Tutel's 2D-hierarchical, DeepSpeed's hierarchical all-to-all).
All modes exchange the row counts first (a few bytes), so that the experts run on filled rows
only, exactly as MoELayer does. ranks_per_node=R groups the ranks into P/R nodes: every step's
accounting splits what goes on the links into intra- and inter-node rows, bytes and messages
(StepStats.wire, pymoe.ep_nodes.node_split); dedup=True sends each token of the forward dispatch
at most once per destination node (DeepEP) and fans it out there.

The arithmetic is pymoe.token_groups's, shared with MoELayer(token_groups=P): P ranks produce, bit for
bit, the outputs, input gradients and parameter gradients of that one-process layer (the
objective and load_stats are explained there). Needs `pip install 'pymoe-routing[mpi]'` (mpi4py + MPICH);
run with `mpiexec -n P python script.py`; without mpiexec a script is a 1-rank world. An
exception inside a step on any rank ends the step on every rank (PeerFailed on the others), and
one nobody catches aborts the job (an excepthook installed by ExpertParallelMoE).
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _checks, ep_nodes, token_groups
from .capacity import expert_capacity
from .experts import EXPERT_PARAMS
from .layer import MoELayer
from .options import check_group_extras, check_token_groups, token_mask_arg
from .routing import Routing, skip_route_draws

EXCHANGES = ("exact", "fixed")  # the flat exchanges
ALL_EXCHANGES = EXCHANGES + ("hierarchical",)  # and the multi-hop one (pymoe.ep_nodes)
DIRECTIONS = ("dispatch", "combine", "grad_dispatch", "grad_combine")
TIME_KEYS = ("routing", "exchange", "experts", "combine")


def mpi() -> Any:
    """mpi4py's MPI module, imported on first use (the `mpi` extra)."""
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as err:  # RuntimeError: mpi4py without an MPI library
        raise ImportError("pymoe.expert_parallel needs mpi4py and an MPI library: "
                          f"pip install 'pymoe-routing[mpi]' ({err})") from err
    return MPI


@dataclass
class StepStats:
    """What one rank sent in one step (forward + backward), per destination rank.

    rows[d][q]: token rows this rank sent to rank q in exchange d (one of DIRECTIONS);
    bytes[d][q]: bytes of those messages (in "fixed" mode the whole capacity buffers);
    padding_bytes[d][q]: the part of bytes[d][q] that is padding (0 in "exact" mode);
    control_bytes: the rest this rank sent (row counts, argument checks' integers, load
    statistics, router gradients); times: seconds in "routing", "exchange" (packing rows into
    messages and out of them, and the MPI calls), "experts", "combine" (local gather/scatter),
    forward and backward added, and "mpi": the part of "exchange" spent inside MPI calls.
    Messages to the rank itself are counted (MPI copies them locally).
    rows and bytes are end to end (origin rank -> final rank, what the flat exchange sends);
    wire_rows/wire_bytes/wire_messages[d][q] are what this rank put on the link to rank q, over
    all stages of a multi-hop exchange (hierarchical, dedup), copies to itself excluded (wire());
    meta_bytes: the delivery indices that travel with the rows in those exchanges (32 bytes per
    delivery and hop).
    """
    rank: int
    size: int
    exchange: str
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    bytes: dict[str, np.ndarray] = field(default_factory=dict)
    padding_bytes: dict[str, np.ndarray] = field(default_factory=dict)
    control_bytes: int = 0
    times: dict[str, float] = field(default_factory=dict)
    ranks_per_node: int = 1
    wire_rows: dict[str, np.ndarray] = field(default_factory=dict)
    wire_bytes: dict[str, np.ndarray] = field(default_factory=dict)
    wire_messages: dict[str, np.ndarray] = field(default_factory=dict)
    meta_bytes: int = 0

    def wire(self, d: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, bytes, messages) `[P]` this rank put on the link to each rank in exchange d: a
        multi-hop exchange's own record, else the flat exchange's rows and bytes (one message
        per other rank it sends anything to); 0 to itself."""
        if d in self.wire_rows:
            return self.wire_rows[d], self.wire_bytes[d], self.wire_messages[d]
        other = np.arange(self.size) != self.rank
        rows, nbytes = self.rows[d] * other, self.bytes[d] * other
        return rows, nbytes, (nbytes > 0).astype(np.int64)

    def total_bytes(self, *, to_others: bool = False) -> int:
        """All row bytes sent in the step (optionally only those to other ranks)."""
        mask = np.arange(self.size) != self.rank if to_others else slice(None)
        return int(sum(b[mask].sum() for b in self.bytes.values()))

    def total_padding(self) -> int:
        return int(sum(b.sum() for b in self.padding_bytes.values()))


class _MPIExchange:
    """token_groups.Exchange over MPI: this rank's one group, its E/P experts."""

    def __init__(self, comm: Any, num_local: int, mode: str, stats: StepStats) -> None:
        self.comm, self.El, self.mode, self.stats = comm, num_local, mode, stats
        self.P, self.rank = comm.Get_size(), comm.Get_rank()
        self.num_token_groups = self.P
        self.directions = iter(DIRECTIONS)

    def agree(self, step: str, problem: str | None, fatal: bool = False) -> None:
        every = self.comm.allgather((problem, fatal))
        self.stats.control_bytes += 8 * self.P
        _raise_shared(f"{step} failed on ", every, fatal)

    # -- counts
    def set_loads(self, loads: Sequence[np.ndarray], capacities: Sequence[int]) -> None:
        P, El = self.P, self.El
        self.n = np.asarray(loads[0], dtype=np.int64)  # [E] rows I send per expert
        self.C = int(capacities[0])
        meta = np.empty((P, El + 1), dtype=np.int64)  # per destination: its experts' counts, my C
        meta[:, :El] = self.n.reshape(P, El)
        meta[:, El] = self.C
        got = np.empty_like(meta)
        t0 = time.perf_counter()
        self.comm.Alltoall(meta, got)
        self._mpi_time(t0)
        self.stats.control_bytes += meta.nbytes
        self.recv_n = got[:, :El]  # [P, El] rows each source sends to each of my experts
        self.recv_C = got[:, El]  # [P] each source's capacity
        self.send_rows = self.n.reshape(P, El).sum(axis=1)  # [P]
        self.recv_rows = self.recv_n.sum(axis=1)  # [P]
        # where source s's rows of my expert e start in the packed [El, sum C, D] buffer
        self.start = np.cumsum(self.recv_n, axis=0) - self.recv_n  # [P, El]
        self.kept_mask = np.arange(self.C)[None, :] < self.n[:, None]  # [E, C]

    def _alltoallv(self, send: np.ndarray, send_counts: np.ndarray, recv: np.ndarray,
                   recv_counts: np.ndarray) -> None:
        """Alltoallv of raw bytes; counts are in bytes per rank."""
        sc, rc = send_counts.astype(np.int64), recv_counts.astype(np.int64)
        sd, rd = np.cumsum(sc) - sc, np.cumsum(rc) - rc
        MPI = mpi()
        t0 = time.perf_counter()
        self.comm.Alltoallv([send.reshape(-1).view(np.uint8), (sc, sd), MPI.BYTE],
                            [recv.reshape(-1).view(np.uint8), (rc, rd), MPI.BYTE])
        self._mpi_time(t0)

    def _mpi_time(self, t0: float) -> None:
        self.stats.times["mpi"] = self.stats.times.get("mpi", 0.0) + time.perf_counter() - t0

    def _record(self, rows: np.ndarray, nbytes: np.ndarray, padding: np.ndarray) -> None:
        d = next(self.directions)
        self.stats.rows[d] = rows.astype(np.int64)
        self.stats.bytes[d] = nbytes.astype(np.int64)
        self.stats.padding_bytes[d] = padding.astype(np.int64)

    # -- rows
    def to_experts(self, blocks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        blk = blocks[0]  # [E, C, D]
        E, C, D = blk.shape
        P, El = self.P, self.El
        row = D * blk.itemsize
        packed = np.zeros((El, int(self.recv_C.sum()), D), dtype=blk.dtype)
        if self.mode == "exact":
            send = np.ascontiguousarray(blk[self.kept_mask])  # [sum n, D] expert-major
            recv = np.empty((int(self.recv_rows.sum()), D), dtype=blk.dtype)
            self._alltoallv(send, self.send_rows * row, recv, self.recv_rows * row)
            pos = 0
            for s in range(P):
                for e in range(El):
                    m, a = self.recv_n[s, e], self.start[s, e]
                    packed[e, a:a + m] = recv[pos:pos + m]
                    pos += m
            self._record(self.send_rows, self.send_rows * row, np.zeros(P))
        else:
            send = np.ascontiguousarray(blk)  # [P, El, C, D]: each rank's experts in a block
            recv = np.empty(int((El * self.recv_C).sum()) * D, dtype=blk.dtype)
            self._alltoallv(send, np.full(P, El * C * row), recv, El * self.recv_C * row)
            pos = 0
            for s in range(P):
                Cs = int(self.recv_C[s])
                src = recv[pos:pos + El * Cs * D].reshape(El, Cs, D)
                pos += El * Cs * D
                for e in range(El):
                    m, a = self.recv_n[s, e], self.start[s, e]
                    packed[e, a:a + m] = src[e, :m]
            self._record(self.send_rows, np.full(P, El * C * row),
                         (El * C - self.send_rows) * row)
        return packed, self.recv_n.sum(axis=0)

    def from_experts(self, packed: np.ndarray) -> list[np.ndarray]:
        El, _, D = packed.shape
        P, E, C = self.P, self.El * self.P, self.C
        row = D * packed.itemsize
        out = np.zeros((E, C, D), dtype=packed.dtype)
        if self.mode == "exact":
            parts = [packed[e, self.start[s, e]:self.start[s, e] + self.recv_n[s, e]]
                     for s in range(P) for e in range(El)]
            send = np.concatenate(parts) if parts else np.empty((0, D), packed.dtype)
            recv = np.empty((int(self.send_rows.sum()), D), dtype=packed.dtype)
            self._alltoallv(send, self.recv_rows * row, recv, self.send_rows * row)
            out[self.kept_mask] = recv
            self._record(self.recv_rows, self.recv_rows * row, np.zeros(P))
        else:
            blocks = []
            for s in range(P):
                b = np.zeros((El, int(self.recv_C[s]), D), dtype=packed.dtype)
                for e in range(El):
                    m, a = self.recv_n[s, e], self.start[s, e]
                    b[e, :m] = packed[e, a:a + m]
                blocks.append(b.reshape(-1))
            send = np.concatenate(blocks)
            self._alltoallv(send, El * self.recv_C * row, out, np.full(P, El * C * row))
            self._record(self.recv_rows, El * self.recv_C * row,
                         (El * self.recv_C - self.recv_rows) * row)
        return [out]

    def sum_in_group_order(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        mine = np.ascontiguousarray(parts[0])
        every = np.empty((self.P,) + mine.shape, dtype=mine.dtype)
        t0 = time.perf_counter()
        self.comm.Allgather(mine, every)
        self._mpi_time(t0)
        self.stats.control_bytes += mine.nbytes * self.P
        return token_groups.sum_in_order(list(every))


class _MPINodeExchange(ep_nodes.NodeExchange, _MPIExchange):
    """_MPIExchange with nodes: the multi-hop exchanges of pymoe.ep_nodes, all four with
    exchange="hierarchical", the forward dispatch only with dedup=True and exchange="exact"
    (across to the same local index, then fanned out: DeepEP's path); the flat ones are
    _MPIExchange's own."""

    def __init__(self, comm: Any, num_local: int, mode: str, stats: StepStats,
                 ranks_per_node: int, dedup: bool, subcomms: dict[str, Any], k: int) -> None:
        super().__init__(comm, num_local, mode, stats)
        self.R, self.dedup, self.subcomms, self.k = ranks_per_node, dedup, subcomms, k
        self.MPI = mpi()
        self.plan: tuple[str, ...] = ()
        self.owner: np.ndarray | None = None

    def _direction(self) -> str:
        """The next exchange's name, and its stages in self.plan (() = the flat exchange, which
        then reads the name again: it is put back)."""
        d = next(self.directions)
        self.plan = ep_nodes.stage_plan(self.mode, self.dedup and d == "dispatch")
        if not self.plan:
            self.directions = itertools.chain([d], self.directions)
        return d

    def set_slot_owners(self, owners: Sequence[np.ndarray]) -> None:
        """The routing's slot owners `<int64>[E, C]` (t * K + j, -1 empty): which slots hold the
        same token, for the deduplicated dispatch."""
        self.owner = np.asarray(owners[0])

    def _logical(self, d: str, rows: np.ndarray, D: int, itemsize: int) -> None:
        self.stats.rows[d] = rows.astype(np.int64)
        self.stats.bytes[d] = rows.astype(np.int64) * D * itemsize
        self.stats.padding_bytes[d] = np.zeros(self.P, np.int64)

    def to_experts(self, blocks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        d = self._direction()
        if not self.plan:
            return super().to_experts(blocks)
        blk = blocks[0]  # [E, C, D]
        El, R, D = self.El, self.R, blk.shape[2]
        e, c = np.nonzero(self.kept_mask)  # the kept slots, expert-major
        final = e // El  # [m] the rank of each slot's expert
        if self.dedup and d == "dispatch":  # one row per (token, destination node)
            assert self.owner is not None  # token_groups.forward_groups gave the slot owners
            key = (self.owner[e, c] // self.k) * (self.P // R) + final // R
            _, first, item = np.unique(key, return_index=True, return_inverse=True)
            data = blk[e[first], c[first]]  # dispatch copies x: every slot of a token, same bits
            lane = (final // R) % R  # chosen by the node: the token's deliveries stay together
        else:
            data, item, lane = blk[e, c], np.arange(e.size), final % R
        deliv = np.column_stack([item.reshape(-1), final, self.rank * El + e % El, c])
        got, dl = self.move(d, data, deliv.astype(np.int64), lane, self._mpi_time)
        packed = np.zeros((El, int(self.recv_C.sum()), D), dtype=blk.dtype)
        s, el = dl[:, 2] // El, dl[:, 2] % El
        packed[el, self.start[s, el] + dl[:, 3]] = got[dl[:, 0]]
        self._logical(d, self.send_rows, D, blk.itemsize)
        return packed, self.recv_n.sum(axis=0)

    def from_experts(self, packed: np.ndarray) -> list[np.ndarray]:
        d = self._direction()
        if not self.plan:
            return super().from_experts(packed)
        El, _, D = packed.shape
        n = self.recv_n.reshape(-1)  # [P * El] rows of (source s, my expert el), s-major
        grp = np.repeat(np.arange(n.size), n)
        c = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        s, el = grp // El, grp % El
        data = packed[el, self.start[s, el] + c]
        deliv = np.column_stack([np.arange(c.size), s, self.rank * El + el, c]).astype(np.int64)
        got, dl = self.move(d, data, deliv, s % self.R, self._mpi_time)
        out = np.zeros((El * self.P, self.C, D), dtype=packed.dtype)
        out[dl[:, 2], dl[:, 3]] = got[dl[:, 0]]
        self._logical(d, self.recv_rows, D, packed.itemsize)
        return [out]


def step_bytes(T_local: int, E: int, K: int, D: int, P: int, capacity_factor: float | None,
               itemsize: int, exchange: str, kept_rows: int | None = None) -> dict[str, int]:
    """All-to-all bytes of one training step (forward + backward: 4 exchanges), per rank.

    fixed:  every exchange sends E * C * D * itemsize bytes per rank, C = expert_capacity(T_local,
            E, K, capacity_factor): K * T_local * capacity_factor * D * itemsize, about (rounding
            C up); a share (P - 1) / P of it leaves the rank.
    exact:  every exchange sends kept_rows * D * itemsize per rank, kept_rows <= K * T_local (the
            bound, used when kept_rows is None, is reached when nothing is dropped); how much
            leaves the rank depends on the routing ((P - 1) / P of it for uniform routing).
    Returns {"per_exchange", "per_step", "per_step_to_others"} in bytes; the last is exact for
    "fixed" and the uniform-routing estimate for "exact". Capacity needs a factor in fixed mode.
    """
    if exchange == "fixed":
        if capacity_factor is None:
            raise ValueError("capacity_factor: the fixed exchange needs a capacity factor")
        rows = E * expert_capacity(T_local, E, K, capacity_factor)
    else:
        rows = K * T_local if kept_rows is None else kept_rows
    per = rows * D * itemsize
    return {"per_exchange": per, "per_step": 4 * per, "per_step_to_others": 4 * per * (P - 1) // P}


PeerFailed = token_groups.PeerFailed


def _raise_shared(prefix: str, every: Sequence[tuple[str | None, bool]], fatal: bool) -> None:
    """Every rank's (problem, fatal) from one allgather: a rank with a fatal problem returns (it
    re-raises its own exception); when any rank had one, the others raise PeerFailed; else any
    problems are argument errors, the same ValueError on every rank."""
    if fatal:
        return
    failed = [f"rank {r}: {pr}" for r, (pr, f) in enumerate(every) if f]
    if failed:
        raise PeerFailed(prefix + "; ".join(failed) + " (this rank stops too)")
    bad = [f"rank {r}: {pr}" for r, (pr, _) in enumerate(every) if pr is not None]
    if bad:
        raise ValueError(prefix + "; ".join(bad))


def _abort_on_uncaught(comm: Any) -> None:
    """Install a sys.excepthook that prints the traceback and then calls comm.Abort(1) when the
    world has more than one rank: under `mpiexec -n P python script.py` an exception nobody
    catches would otherwise end one rank and leave the others waiting in a collective forever
    (mpi4py aborts only under `python -m mpi4py`). Installed once, by ExpertParallelMoE."""
    import sys

    if getattr(sys.excepthook, "_pymoe_abort", False) or comm.Get_size() == 1:
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        # The traceback goes out in one write(2) before Abort: printed line by line, a rank
        # could be killed mid-traceback by another rank's Abort, and every rank's message
        # could end up cut off; this way the aborting rank's own message is always whole.
        try:
            if previous is sys.__excepthook__:
                import os
                import traceback
                sys.stderr.flush()
                text = "".join(traceback.format_exception(kind, value, tb)).encode()
                while text:  # a pipe may take it in parts
                    text = text[os.write(2, text):]
            else:  # someone else's hook: let it print
                previous(kind, value, tb)
                sys.stderr.flush()
        finally:
            comm.Abort(1)

    hook._pymoe_abort = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def _digest(a: np.ndarray) -> str:
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _bias_digest(layer: MoELayer) -> str:
    b = layer.expert_bias
    return "none" if b is None else _digest(np.asarray(b))


def _step_digest(layer: MoELayer) -> str:
    """What every forward() compares across ranks: every keyword (layer.options can be replaced
    between steps) and the expert bias (updated by the training loop)."""
    h = hashlib.sha256(repr(sorted(_config(layer).items())).encode())
    h.update(_bias_digest(layer).encode())
    return h.hexdigest()


def _config(layer: MoELayer) -> dict[str, Any]:
    """Every setting the ranks must agree on: the sizes and every keyword (pymoe.options)."""
    return {"d_model": layer.d_model, "d_hidden": layer.d_hidden,
            "num_experts": layer.num_experts, **dataclasses.asdict(layer.options),
            **dataclasses.asdict(layer.expert_options), "dtype": str(layer.dtype),
            "backend": layer.backend.name}


class ExpertParallelMoE:
    """A MoELayer split over the ranks of an MPI communicator (module docstring).

    Args:
        layer: the same MoELayer on every rank (same settings and parameters: checked at start,
            every rank raising the same ValueError when they differ). Its router is used as is;
            this rank keeps a copy of its own experts' parameters.
        comm: an mpi4py communicator (default MPI.COMM_WORLD); P = its size must divide E
            (with a placement: N).
        exchange: "exact", "fixed" or "hierarchical" (module docstring).
        load_stats: "local" or "global" statistics for the aux loss (pymoe.token_groups).
        placement: None (expert e on rank e // (E/P)) or redundant experts: phy2log `[N]`, N a
            multiple of P, the logical expert of each of N slots, rank r holding slots
            [r*N/P, (r+1)*N/P) (one layer of pymoe.eplb.rebalance_experts' phy2log; rows and
            gradients as pymoe.ep_replicas says). Needs exchange="exact" and dedup=False.
        ranks_per_node: R, dividing P: ranks q // R form node q (pymoe.ep_nodes); only the
            accounting and the multi-hop exchanges read it.
        dedup: send each token of the forward dispatch at most once per destination node and
            fan it out there (DeepEP); needs exchange "exact" or "hierarchical".
        max_nodes: M, or None: the layer must route node-limited, each token to experts on at
            most M nodes (built with `**pymoe.ep_nodes.node_limited_routing(P, R, M)`; checked).

    Attributes:
        params, grads: w_router `[D, E]` and b_router `[E]` (the layer's own router arrays,
            replicated) and this rank's experts: w1 `[E/P, D, H]`, b1, w2, b2 (with a placement:
            its slots', `[N/P, ...]`). Update in place.
        experts: range of the global expert ids held here (with a placement: a tuple, the
            logical expert of each slot held here, in slot order).
        routing, aux_loss, z_loss: this rank's from the last forward (aux_loss is the global aux
            loss under load_stats="global").
        stats: StepStats of the last step (reset by forward, completed by backward).
    """

    def __init__(self, layer: MoELayer, comm: Any = None, *, exchange: str = "exact",
                 load_stats: str = "local", placement: Any = None, ranks_per_node: int = 1,
                 dedup: bool = False, max_nodes: int | None = None) -> None:
        MPI = mpi()
        self.comm = MPI.COMM_WORLD if comm is None else comm
        P, rank = self.comm.Get_size(), self.comm.Get_rank()
        problem: str | None = None
        cfg: dict[str, Any] = {}
        digests: dict[str, str] = {}
        failure: BaseException | None = None
        _abort_on_uncaught(MPI.COMM_WORLD)
        try:  # find local problems first, then decide together: nobody waits for a rank that left
            if not isinstance(layer, MoELayer):
                raise TypeError(f"layer: expected a pymoe.MoELayer, got {type(layer).__name__}")
            self.exchange = _checks.choice("exchange", exchange, ALL_EXCHANGES)
            self.load_stats = _checks.choice("load_stats", load_stats, token_groups.LOAD_STATS)
            check_token_groups("layer", layer.options, layer.router_noise, self.load_stats)
            check_group_extras("layer", layer.expert_options)
            if layer.token_groups != 1:
                raise ValueError("layer: expected token_groups=1 (each rank is one group), got "
                                 f"{layer.token_groups}")
            if layer.formulation != "indexed":
                raise ValueError("layer: expected formulation='indexed', got "
                                 f"{layer.formulation!r}")
            for extra in ("gate_input", "output_bias", "post_norm"):
                if getattr(layer, extra):
                    raise ValueError(f"layer: expected {extra}=False (the ranks run the routed "
                                     "experts only)")
            self.ranks_per_node = ep_nodes.check_ranks_per_node(ranks_per_node, P)
            self.dedup = _checks.boolean("dedup", dedup)
            if self.dedup and self.exchange == "fixed":
                raise ValueError("dedup: the fixed exchange sends whole capacity buffers, one "
                                 "row per slot; dedup=True needs exchange='exact' or "
                                 "'hierarchical'")
            if max_nodes is not None:
                want = ep_nodes.node_limited_routing(P, self.ranks_per_node, max_nodes)
                got = {n: getattr(layer.options, n) for n in want}
                if got != want:
                    raise ValueError(f"max_nodes: {max_nodes} needs a layer routed node-limited, "
                                     f"{want} (MoELayer(..., **pymoe.ep_nodes.node_limited_"
                                     f"routing(P, ranks_per_node, max_nodes))), got {got}")
            cfg = {**_config(layer), "exchange": exchange, "load_stats": load_stats,
                   "ranks_per_node": ranks_per_node, "dedup": dedup, "max_nodes": max_nodes}
            self.placement = None
            if placement is not None:  # redundant experts (pymoe.ep_replicas)
                from . import ep_replicas
                if self.exchange != "exact" or self.dedup:
                    raise ValueError(f"placement: redundant experts need exchange='exact' and "
                                     f"dedup=False, got exchange={self.exchange!r}, "
                                     f"dedup={self.dedup}")
                self.placement = ep_replicas.check_placement(placement, layer.num_experts, P)
                cfg["placement"] = self.placement.tolist()
            digests = {n: _digest(p) for n, p in layer.params.items()}
            digests["expert_bias"] = _bias_digest(layer)
        except (TypeError, ValueError) as err:
            problem = f"{type(err).__name__}: {err}"
        except BaseException as err:  # shared, then re-raised below: nobody waits for this rank
            problem, failure = f"{type(err).__name__}: {err}", err
        every = self.comm.allgather((problem, failure is not None, cfg, digests))
        _raise_shared("expert parallel setup failed on ", [e[:2] for e in every], failure is not None)
        if failure is not None:
            raise failure  # after the other ranks were told
        for r, (_, _, c, _) in enumerate(every):
            diff = [n for n in sorted(set(cfg) | set(c)) if c.get(n) != cfg.get(n)]
            if diff:
                raise ValueError(f"layer: settings differ across ranks: rank {r} has "
                                 + ", ".join(f"{n}={c.get(n)!r}" for n in diff)
                                 + f", rank {rank} has "
                                 + ", ".join(f"{n}={cfg.get(n)!r}" for n in diff))
        first = every[0][3]
        for r, (_, _, _, d) in enumerate(every):
            names = sorted(set(d) | set(first))
            diff = [n for n in names if d.get(n) != first.get(n)]
            if diff:
                missing = [n for n in diff if n not in d or n not in first]
                what = (f" (held by only one of them: {', '.join(missing)})" if missing else "")
                raise ValueError(f"layer: parameters differ across ranks: {', '.join(diff)} on "
                                 f"rank {r} differ from rank 0's{what} (build the layer with the "
                                 "same seed and settings everywhere, or broadcast rank 0's "
                                 "parameters and expert_bias)")
        E = layer.num_experts
        if E % P and self.placement is None:
            raise ValueError(f"num_experts: E = {E} experts cannot be split evenly over "
                             f"P = {P} ranks (E must be a multiple of P)")
        self.layer, self.size, self.rank = layer, P, rank
        self.num_local = E // P
        self.experts = range(rank * self.num_local, (rank + 1) * self.num_local)
        sl: Any = slice(self.experts.start, self.experts.stop)
        if self.placement is not None:  # this rank's slots: copies of their logical experts
            self.num_local = len(self.placement) // P
            sl = self.placement[rank * self.num_local:(rank + 1) * self.num_local]
            self.experts = tuple(int(e) for e in sl)  # type: ignore[assignment]
        self.params: dict[str, np.ndarray] = {
            "w_router": layer.params["w_router"], "b_router": layer.params["b_router"],
            **{n: layer.params[n][sl].copy() for n in EXPERT_PARAMS},
            **layer.shared_params()}
        self.grads = {n: np.zeros_like(p) for n, p in self.params.items()}
        self.routing: Routing | None = None
        self.aux_loss = self.z_loss = 0.0
        R = self.ranks_per_node
        self.subcomms: dict[str, Any] = {}
        if ep_nodes.stage_plan(self.exchange, self.dedup):  # collective: every rank is here
            self.subcomms = {"node": self.comm.Split(rank // R, rank % R),
                             "lane": self.comm.Split(rank % R, rank // R)}
        self.stats = self._new_stats()
        self._cache: tuple[tuple[int, ...], np.dtype, token_groups.GroupsCache,
                           _MPIExchange] | None = None

    def _new_stats(self) -> StepStats:
        return StepStats(self.rank, self.size, self.exchange, ranks_per_node=self.ranks_per_node)

    def _agree(self, problem: str | None, value: Any = None, fatal: bool = False) -> list[Any]:
        """Allgather (problem, value); every rank raises the same ValueError if any had an
        argument error, PeerFailed where another rank had any other exception (the rank that had
        it returns, and re-raises it)."""
        every = self.comm.allgather((problem, fatal, value))
        self.stats.control_bytes += 8 * self.size
        _raise_shared("", [e[:2] for e in every], fatal)
        return [v for _, _, v in every]

    def forward(self, x: np.ndarray, token_mask: np.ndarray | None = None) -> np.ndarray:
        """y `[T_local, D]` (or x's shape `[..., D]`) for this rank's tokens x.

        token_mask: `<bool>` of shape x.shape[:-1], True = a real token, or None: this rank's
        part of the mask, split like x (MoELayer.forward; every rank passes one or none does).
        Collective: every rank calls it, with the same T_local > 0 (checked together).
        """
        L = self.layer
        self.stats = self._new_stats()
        problem, T, failure, setting = None, 0, None, ""
        mask: np.ndarray | None = None
        try:
            x = _checks.float_array("x", x, min_ndim=1)
            if x.shape[-1] != L.d_model:
                raise ValueError(f"x: expected shape [..., {L.d_model}] (D = d_model), got "
                                 f"{tuple(x.shape)}")
            T = int(np.prod(x.shape[:-1]))
            if T == 0:
                raise ValueError("x: T_local = 0 tokens; every rank needs at least one token")
            if token_mask is not None:  # a rank may hold only padding; the job may not
                mask = np.asarray(token_mask)
                if mask.dtype == np.bool_ and mask.shape == x.shape[:-1]:
                    mask = np.ascontiguousarray(mask.reshape(-1))
                else:
                    mask = token_mask_arg(mask, x.shape[:-1])
            setting = _step_digest(L)
        except (TypeError, ValueError) as err:
            problem = str(err)
        except BaseException as err:  # shared, then re-raised: nobody waits for this rank
            problem, failure = f"{type(err).__name__}: {err}", err
        n_real = T if mask is None else int(np.count_nonzero(mask))
        draw = T if mask is None or L.padding == "routed" else n_real  # what routing draws for
        every = self._agree(problem, (T, setting, mask is not None, n_real, draw),
                            failure is not None)
        if failure is not None:
            raise failure
        if len({e[2] for e in every}) > 1:
            raise ValueError("token_mask: passed on ranks "
                             f"{[r for r, e in enumerate(every) if e[2]]} only; pass one on every "
                             "rank (all True where a rank has no padding) or on none")
        if mask is not None and not any(e[3] for e in every):
            raise ValueError("token_mask: every token on every rank is padding (all False); "
                             "pass at least one real token")
        draw_sizes = [e[4] for e in every]  # tokens each rank's routing draws for
        every = [e[:2] for e in every]
        Ts = [t for t, _ in every]
        if len(set(Ts)) > 1:
            raise ValueError(f"x: every rank needs the same number of tokens T_local (the groups "
                             f"are of equal size), got {Ts} on ranks 0..{self.size - 1}")
        if len({d for _, d in every}) > 1:
            raise ValueError("layer: the routing settings or expert_bias differ across ranks "
                             f"(digests {[d[:8] for _, d in every]} on ranks 0..{self.size - 1}); "
                             "update expert_bias from the global load, the same on every rank, "
                             "and change layer.options on every rank alike")
        x2 = x.reshape(-1, L.d_model).astype(L.dtype, copy=False)  # [T_local, D]
        ex = self._exchange()
        draws = L.options.random  # one generator, drawn group after group as MoELayer does
        if draws:  # groups before this rank's
            skip_route_draws(L.options, T, L._noise_rng, self.rank, draw_sizes[:self.rank])
        ys, gc, aux, z = token_groups.forward_groups(L, [x2], self._expert_params(), ex,
                                                self.load_stats, False, self.stats.times,
                                                None if mask is None else [mask])
        if draws:  # and after
            skip_route_draws(L.options, T, L._noise_rng, self.size - 1 - self.rank,
                             draw_sizes[self.rank + 1:])
        self._cache = (x.shape, x.dtype, gc, ex)
        self.routing, self.aux_loss, self.z_loss = gc.groups[0].routing, aux, z
        return ys[0].reshape(x.shape)

    __call__ = forward

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """dx for this rank's tokens; fills self.grads (router: mean over ranks; experts: the
        sum of every rank's contributions / P; pymoe.token_groups). Collective."""
        problem: str | None = None
        failure: BaseException | None = None
        try:
            if self._cache is None:
                raise ValueError("backward: called before forward()")
            dy = _checks.float_array("dy", dy, shape=self._cache[0])
        except (TypeError, ValueError) as err:
            problem = str(err)
        except BaseException as err:  # shared, then re-raised: nobody waits for this rank
            problem, failure = f"{type(err).__name__}: {err}", failure or err
        self._agree(problem, None, failure is not None)
        if failure is not None:
            raise failure
        assert self._cache is not None  # _agree raised on every rank otherwise
        x_shape, x_dtype, gc, ex = self._cache
        ex.directions = iter(DIRECTIONS[2:])  # a second backward() records its exchanges again
        L = self.layer
        dy2 = dy.reshape(-1, L.d_model).astype(L.dtype, copy=False)
        dxs, grads = token_groups.backward_groups(L, gc, [dy2], self._expert_params(),
                                             self.stats.times)
        if self.placement is not None:  # replicas of one expert: the sum of their gradients
            from .ep_replicas import ReplicaExchange, sum_replica_grads
            assert isinstance(ex, ReplicaExchange)
            sum_replica_grads(ex, grads)
        self.grads = grads
        return dxs[0].reshape(x_shape).astype(x_dtype, copy=False)

    def _exchange(self) -> Any:
        if self.placement is None:
            return _MPINodeExchange(self.comm, self.num_local, self.exchange, self.stats,
                                    self.ranks_per_node, self.dedup, self.subcomms,
                                    self.layer.k)
        from .ep_replicas import ReplicaExchange  # the flat exact exchange, re-aimed at replicas
        base = _MPIExchange(self.comm, self.num_local, self.exchange, self.stats)
        return ReplicaExchange(base, self.placement, self.layer.num_experts)

    def _expert_params(self) -> dict[str, np.ndarray]:
        return {n: self.params[n] for n in EXPERT_PARAMS}

    def gather_stats(self) -> dict[str, np.ndarray]:
        """Collective: the last step's statistics of every rank, as arrays.

        Returns rows, bytes, padding_bytes: `[4, P, P]` [exchange (DIRECTIONS order), sender,
        receiver], end to end; wire_rows, wire_bytes, wire_messages: `[4, P, P]`, what went on
        each link (StepStats.wire; pymoe.ep_nodes.node_split splits them by node); control_bytes,
        meta_bytes `[P]`; times `[P, 5]` (TIME_KEYS order and "mpi", seconds).
        """
        s, P = self.stats, self.size
        wire = [s.wire(d) for d in DIRECTIONS]
        mine = np.concatenate([*(s.rows[d] for d in DIRECTIONS), *(s.bytes[d] for d in DIRECTIONS),
                               *(s.padding_bytes[d] for d in DIRECTIONS),
                               *(w[0] for w in wire), *(w[1] for w in wire), *(w[2] for w in wire),
                               [s.control_bytes, s.meta_bytes],
                               [s.times.get(k, 0.0) for k in TIME_KEYS + ("mpi",)]]
                              ).astype(np.float64)  # byte counts < 2**53: exact in float64
        every = np.empty((P, mine.size))
        self.comm.Allgather(mine, every)
        n = 4 * P
        names = ("rows", "bytes", "padding_bytes", "wire_rows", "wire_bytes", "wire_messages")
        out: dict[str, np.ndarray] = {  # [P, 4P] -> [4, P, P] each
            k: every[:, i * n:(i + 1) * n].reshape(P, 4, P).transpose(1, 0, 2).astype(np.int64)
            for i, k in enumerate(names)}
        at = len(names) * n
        out["control_bytes"] = every[:, at].astype(np.int64)
        out["meta_bytes"] = every[:, at + 1].astype(np.int64)
        out["times"] = every[:, at + 2:]
        return out

    def gather_node_stats(self, links: ep_nodes.Links | None = None) -> dict[str, Any]:
        """Collective: the last step's link statistics split by node (pymoe.ep_nodes.node_split:
        "intra"/"inter" rows, bytes, messages `[4]` per exchange, all ranks; "per_rank"), with
        "modelled_seconds" `[4]` per exchange (ep_nodes.modelled_seconds on `links`, default
        ep_nodes.Links(): a model, not a measurement) beside "measured_seconds" `[P]`, each
        rank's measured exchange time (packing and MPI) of the step, forward and backward."""
        st = self.gather_stats()
        split = ep_nodes.node_split({k: st[f"wire_{k}"] for k in ep_nodes.SPLIT_KEYS},
                                    self.ranks_per_node)
        return {**split,
                "modelled_seconds": ep_nodes.modelled_seconds(split, links or ep_nodes.Links()),
                "measured_seconds": st["times"][:, TIME_KEYS.index("exchange")]}
