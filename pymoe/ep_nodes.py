"""Nodes for expert parallelism: what crosses a node boundary, and exchanges that cross it less.

P ranks form N = P / R nodes of R ranks each (ranks_per_node=R): rank q is local rank q % R of
node q // R, and holds experts [q E/P, (q+1) E/P), so node n holds the E/N experts
[n E/N, (n+1) E/N). Links inside a node (NVLink) are about ten times faster than links between
nodes (InfiniBand), so the one number that matters at scale is the inter-node bytes, and, for
small messages, the inter-node message count. This module holds:

- the accounting: every row a rank puts on a link, per destination rank, split into intra-node
  and inter-node rows, bytes and messages (node_split), and a cost model that turns them into a
  modelled time (Links, modelled_seconds), labelled as modelled: this machine has no such links;
- the multi-hop exchange behind exchange="hierarchical" and dedup=True (NodeExchange):
    hierarchical  (Tutel's 2D-hierarchical all-to-all, DeepSpeed's hierarchical all-to-all)
                  stage 1, inside each node: rows regrouped onto the local rank whose index they
                  travel on; stage 2, between nodes, among the ranks with the same local index
                  (one message per node pair and lane, R times fewer and R times larger than the
                  flat exchange's); stage 3, inside the node: scattered to their final ranks.
    dedup         (DeepEP's dispatch) in the forward dispatch each token travels at most once to
                  each destination node, however many of its experts live there, and is fanned out
                  inside that node. The other three exchanges carry rows that differ per expert
                  (expert outputs, gate-weighted gradients) and travel one per (token, expert):
                  DeepEP reduces a token's outputs inside the node before sending them back,
                  which changes the order of the additions, so pymoe does not (bit identity).
  Every stage is an MPI Alltoallv on a communicator from Comm.Split (the ranks of one node, or
  the ranks with one local index), and a row is copied, never computed on, on its way: results
  are the flat exchange's, bit for bit;
- node-limited routing (DeepSeek-V3: each token reaches experts on at most M nodes):
  route()'s group-limited top-K with groups = nodes (node_limited_routing);
- scale arithmetic for DeepSeek-V3's shape (inter_node_arithmetic, `python -m pymoe.ep_nodes`).
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _checks

SPLIT_KEYS = ("rows", "bytes", "messages")


def check_ranks_per_node(ranks_per_node: object, num_ranks: int) -> int:
    """ranks_per_node R: a positive integer dividing the number of ranks P."""
    R = _checks.integer("ranks_per_node", ranks_per_node, low=1)
    if num_ranks % R:
        raise ValueError(f"ranks_per_node: {R} ranks per node do not divide P = {num_ranks} ranks "
                         "into whole nodes (P must be a multiple of ranks_per_node)")
    return R


def node_limited_routing(num_ranks: int, ranks_per_node: int, max_nodes: int) -> dict[str, int]:
    """The MoELayer keywords of node-limited routing (DeepSeek-V3): groups = the N = P / R nodes,
    each token choosing its experts from its max_nodes = M best nodes (route()'s group-limited
    top-K, pymoe.variants.group_limited). `MoELayer(..., **node_limited_routing(P, R, M))`."""
    R = check_ranks_per_node(ranks_per_node, num_ranks)
    N = num_ranks // R
    M = _checks.integer("max_nodes", max_nodes, low=1, high=N)
    return {"num_groups": N, "topk_groups": M}


# ------------------------------------------------------------------------------ accounting
def node_split(wire: dict[str, np.ndarray], ranks_per_node: int) -> dict[str, dict[str, Any]]:
    """Intra- and inter-node totals of gathered wire statistics.

    Args:
        wire: "rows", "bytes", "messages", each `[4, P, P]` [exchange, sender, receiver] of what
            went on a link (ExpertParallelMoE.gather_stats()'s wire_*; a rank's copies to itself
            are on no link and are 0 there).
    Returns:
        {"intra": {"rows", "bytes", "messages"}, "inter": {...}}, each `<int64>[4]` per exchange
        (DIRECTIONS order), summed over all ranks; "per_rank" holds the same `[4, P]` per sender.
    """
    P = wire["rows"].shape[1]
    node = np.arange(P) // ranks_per_node
    same = node[:, None] == node[None, :]  # [P, P]
    out: dict[str, dict[str, Any]] = {"intra": {}, "inter": {}, "per_rank": {}}
    for k in SPLIT_KEYS:
        m = np.asarray(wire[k], dtype=np.int64)
        intra, inter = (m * same).sum(axis=2), (m * ~same).sum(axis=2)  # [4, P]
        out["intra"][k], out["inter"][k] = intra.sum(axis=1), inter.sum(axis=1)
        out["per_rank"][f"intra_{k}"], out["per_rank"][f"inter_{k}"] = intra, inter
    return out


@dataclass(frozen=True)
class Links:
    """Link figures for the cost model (per GPU, one direction; override them for your machine).

    intra_bandwidth: 450e9 B/s, NVLink 4 on an H100 SXM (NVIDIA: 900 GB/s total bandwidth per GPU,
        both directions together). inter_bandwidth: 50e9 B/s, one InfiniBand NDR 400 Gb/s
        ConnectX-7 port per GPU (the H100/H800 clusters of DeepSeek-V3's report and DeepEP's
        README, which measures about 40-58 GB/s over RDMA and about 150 GB/s over NVLink in its
        kernels: real transfers reach less than the link's figure).
    intra_latency, inter_latency: seconds per message, 1e-6 and 2e-6: the order of an MPI or
        NCCL point-to-point latency on NVLink and InfiniBand (an assumption, not a datasheet).
    """
    intra_bandwidth: float = 450e9
    inter_bandwidth: float = 50e9
    intra_latency: float = 1e-6
    inter_latency: float = 2e-6


def modelled_seconds(split: dict[str, dict[str, Any]], links: Links = Links()) -> np.ndarray:
    """Modelled time `[4]` per exchange (DIRECTIONS order), seconds: for each sending rank
    intra_bytes / intra_bandwidth + intra_messages * intra_latency + the same for inter-node,
    links used one after the other (no overlap), and the slowest rank sets the exchange's time.
    A model of links this machine does not have: label it as modelled wherever it is shown."""
    pr = split["per_rank"]
    t = (pr["intra_bytes"] / links.intra_bandwidth + pr["intra_messages"] * links.intra_latency
         + pr["inter_bytes"] / links.inter_bandwidth + pr["inter_messages"] * links.inter_latency)
    return t.max(axis=1)  # [4]


# ------------------------------------------------------------------------------ the exchange
def stage_plan(exchange: str, dedup: bool) -> tuple[str, ...]:
    """The stages of one multi-hop exchange, each "node" (inside a node) or "lane" (between nodes,
    among the ranks with one local index); () for the flat one-stage exchange. dedup: this
    exchange sends each token once per node (the forward dispatch with dedup=True)."""
    if exchange == "hierarchical":
        return ("node", "lane", "node")
    return ("lane", "node") if dedup else ()  # DeepEP: across first, fan out inside the node


def next_hop(stage: int, plan: tuple[str, ...], here: int, final: np.ndarray,
             lane: np.ndarray, R: int) -> np.ndarray:
    """World rank each delivery goes to in stage `stage` of `plan`, from rank `here`.

    final `[m]`: the deliveries' final ranks; lane `[m]`: the local index each travels between
    nodes on (hierarchical: the final rank's local index, or, for a deduplicated token, a lane
    chosen by its destination node so that the token stays one row).
    """
    kind = plan[stage]
    if kind == "lane":
        return (final // R) * R + here % R  # same local index, on the destination node
    if stage == 0:  # regroup inside the node onto the lane's rank
        return np.full_like(final, (here // R) * R) + lane
    return final  # scatter inside the node


class NodeExchange:
    """The multi-hop row movement of one exchange (mixed into expert_parallel's MPI exchange).

    Rows travel with their deliveries: int64 (final rank, key1, key2) per delivery, where the
    final rank reads where the row goes from the keys; a row with several deliveries (a
    deduplicated token) is copied when its deliveries' next hops differ (the fan-out).
    """

    MPI: Any  # mpi4py's MPI module (pymoe.expert_parallel.mpi())
    comm: Any
    P: int
    rank: int
    R: int
    plan: tuple[str, ...]
    subcomms: dict[str, Any]
    stats: Any

    def move(self, d: str, data: np.ndarray, deliv: np.ndarray, lane: np.ndarray,
             mpi_time: Callable[[float], None]) -> tuple[np.ndarray, np.ndarray]:
        """data `[n, D]` rows here; deliv `<int64>[m, 4]` (row index, final rank, key1, key2);
        lane `[m]`. -> (rows, deliveries) arrived here (every final rank is this rank). Records
        the wire rows, bytes and messages of exchange d, per destination world rank."""
        P, R = self.P, self.R
        row_bytes = data.shape[1] * data.itemsize
        wr = np.zeros(P, np.int64)
        wm = np.zeros(P, np.int64)
        for s, kind in enumerate(self.plan):
            comm = self.subcomms[kind]
            here = self.rank
            nh = next_hop(s, self.plan, here, deliv[:, 1], lane, R)  # lane: read at stage 0 only
            if kind == "node":  # comm rank c = local index c on my node
                world, dest = (here // R) * R + np.arange(R), nh % R
            else:  # comm rank c = node c, my local index
                world, dest = np.arange(P // R) * R + here % R, nh // R
            data, deliv, rows_to = self._stage(comm, dest, data, deliv, mpi_time)
            off = world != here
            np.add.at(wr, world[off], rows_to[off])
            np.add.at(wm, world[off], (rows_to[off] > 0).astype(np.int64))
        self.stats.wire_rows[d] = wr
        self.stats.wire_bytes[d] = wr * row_bytes
        self.stats.wire_messages[d] = wm
        return data, deliv

    def _stage(self, comm: Any, dest: np.ndarray, data: np.ndarray, deliv: np.ndarray,
               mpi_time: Callable[[float], None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One Alltoallv stage on comm: each (row, destination) pair travels once."""
        MPI = self.MPI
        Q, me = comm.Get_size(), comm.Get_rank()
        n, D = data.shape
        pair = dest * max(n, 1) + deliv[:, 0]  # [m] one id per (destination, row)
        upair, inv = np.unique(pair, return_inverse=True)  # sorted: by destination, then row
        inv = inv.reshape(-1)
        out_dest, out_row = upair // max(n, 1), upair % max(n, 1)
        rows_to = np.bincount(out_dest, minlength=Q).astype(np.int64)  # [Q]
        first = np.cumsum(rows_to) - rows_to
        order = np.argsort(inv, kind="stable")  # deliveries grouped as their rows are
        meta = np.column_stack([inv - first[out_dest[inv]], deliv[:, 1:]])[order]  # [m, 4]
        deliv_to = np.bincount(dest, minlength=Q).astype(np.int64)
        counts = np.ascontiguousarray(np.stack([rows_to, deliv_to], axis=1))  # [Q, 2]
        got = np.empty_like(counts)
        t0 = time.perf_counter()
        comm.Alltoall(counts, got)
        mpi_time(t0)
        self.stats.control_bytes += counts.nbytes
        send = np.ascontiguousarray(data[out_row])
        recv = np.empty((int(got[:, 0].sum()), D), dtype=data.dtype)
        recv_meta = np.empty((int(got[:, 1].sum()), 4), dtype=np.int64)
        rb = D * data.itemsize
        t0 = time.perf_counter()
        _alltoallv(comm, MPI, send, rows_to * rb, recv, got[:, 0] * rb)
        _alltoallv(comm, MPI, np.ascontiguousarray(meta), deliv_to * 32, recv_meta,
                   got[:, 1] * 32)
        mpi_time(t0)
        self.stats.meta_bytes += int(32 * (deliv_to.sum() - deliv_to[me]))
        src = np.repeat(np.arange(Q), got[:, 1])  # [m'] the stage's sender of each delivery
        row_start = np.cumsum(got[:, 0]) - got[:, 0]
        new = np.column_stack([recv_meta[:, 0] + row_start[src], recv_meta[:, 1:]])
        return recv, new.astype(np.int64), rows_to


def _alltoallv(comm: Any, MPI: Any, send: np.ndarray, send_bytes: np.ndarray, recv: np.ndarray,
               recv_bytes: np.ndarray) -> None:
    """Alltoallv of raw bytes; counts in bytes per comm rank."""
    sc, rc = np.asarray(send_bytes, np.int64), np.asarray(recv_bytes, np.int64)
    sd, rd = np.cumsum(sc) - sc, np.cumsum(rc) - rc
    comm.Alltoallv([send.reshape(-1).view(np.uint8), (sc, sd), MPI.BYTE],
                   [recv.reshape(-1).view(np.uint8), (rc, rd), MPI.BYTE])


# ------------------------------------------------------------------------------ arithmetic
def inter_node_arithmetic(num_experts: int = 256, k: int = 8, num_nodes: int = 8,
                          gpus_per_node: int = 8, max_nodes: int = 4, d_model: int = 7168,
                          itemsize: int = 2, tokens_per_gpu: int = 4096) -> dict[str, Any]:
    """Per-step inter-node bytes and messages of one MoE layer, by arithmetic (not a measurement).

    Assumptions: nothing dropped; each token's K choices land on exactly M = max_nodes distinct
    nodes (the node limit's worst case), each node, its own included, equally likely, so a
    choice is on another node with probability (N - 1) / N and so is each of the M nodes.
    Per GPU and exchange:
        rows without dedup  T K (N - 1) / N        (one row per (token, remote expert))
        rows with dedup     T M (N - 1) / N        (one row per (token, remote node))
    Four exchanges per training step: pymoe deduplicates the forward dispatch only; DeepEP's
    kernels also send each token once per node in the other three (the combine reduced inside
    the node, its backward likewise): "dedup_all" is that arithmetic. The hierarchical exchange
    moves the same inter-node bytes in N - 1 messages per GPU and exchange instead of
    (N - 1) R (R = gpus_per_node). Returns bytes per step for all GPUs together and per GPU.
    """
    for name, v in (("num_experts", num_experts), ("k", k), ("num_nodes", num_nodes),
                    ("gpus_per_node", gpus_per_node), ("max_nodes", max_nodes),
                    ("d_model", d_model), ("itemsize", itemsize),
                    ("tokens_per_gpu", tokens_per_gpu)):
        _checks.integer(name, v, low=1)
    if num_experts % (num_nodes * gpus_per_node):
        raise ValueError(f"num_experts: {num_experts} experts do not split evenly over "
                         f"{num_nodes} x {gpus_per_node} GPUs")
    if max_nodes > num_nodes:
        raise ValueError(f"max_nodes: at most num_nodes = {num_nodes}, got {max_nodes}")
    if k < max_nodes:
        raise ValueError(f"max_nodes: K = {k} choices reach at most {k} nodes, got {max_nodes}")
    N, R, T, M = num_nodes, gpus_per_node, tokens_per_gpu, max_nodes
    row = d_model * itemsize
    remote = (N - 1) / N
    plain, dedup = T * k * remote * row, T * M * remote * row  # bytes per GPU and exchange
    per_gpu = {"none": 4 * plain, "dedup_dispatch": dedup + 3 * plain, "dedup_all": 4 * dedup}
    G = N * R
    return {"per_gpu_bytes": per_gpu, "all_gpus_bytes": {m: G * b for m, b in per_gpu.items()},
            "messages_per_gpu_exchange": {"flat": (N - 1) * R, "hierarchical": N - 1},
            "rows_per_gpu_exchange": {"none": T * k * remote, "dedup": T * M * remote},
            "shape": dict(num_experts=num_experts, k=k, num_nodes=N, gpus_per_node=R,
                          max_nodes=M, d_model=d_model, itemsize=itemsize, tokens_per_gpu=T)}


def _main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="inter-node bytes per step, by arithmetic")
    for name, v in (("num-experts", 256), ("k", 8), ("num-nodes", 8), ("gpus-per-node", 8),
                    ("max-nodes", 4), ("d-model", 7168), ("itemsize", 2),
                    ("tokens-per-gpu", 4096)):
        ap.add_argument(f"--{name}", type=int, default=v)
    a = ap.parse_args(argv)
    r = inter_node_arithmetic(a.num_experts, a.k, a.num_nodes, a.gpus_per_node, a.max_nodes,
                              a.d_model, a.itemsize, a.tokens_per_gpu)
    print(f"Arithmetic, not a measurement: {r['shape']}, nothing dropped, each token on exactly "
          "max_nodes nodes")
    print("inter-node bytes per layer and training step (4 exchanges):")
    for m, b in r["per_gpu_bytes"].items():
        print(f"  {m:15s} {b / 1e9:8.3f} GB per GPU  {r['all_gpus_bytes'][m] / 1e9:9.2f} GB all GPUs")
    mp = r["messages_per_gpu_exchange"]
    print(f"inter-node messages per GPU and exchange: flat {mp['flat']}, hierarchical "
          f"{mp['hierarchical']} (the same bytes, {mp['flat'] // mp['hierarchical']}x larger "
          "messages)")
    links = Links()
    print(f"modelled at {links.inter_bandwidth / 1e9:.0f} GB/s and "
          f"{links.inter_latency * 1e6:.0f} us per inter-node message per GPU (pymoe.ep_nodes.Links; "
          "a model, not a measurement), ms per layer and step:")
    for m, b in r["per_gpu_bytes"].items():
        t = {w: b / links.inter_bandwidth + 4 * n * links.inter_latency for w, n in mp.items()}
        print(f"  {m:15s} flat {1e3 * t['flat']:7.2f}  hierarchical {1e3 * t['hierarchical']:7.2f}")


if __name__ == "__main__":
    _main()
