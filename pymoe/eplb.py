"""Expert-parallel load balancer (EPLB): where to put redundant copies of hot experts.

A NumPy port of deepseek-ai/EPLB's `eplb.py` (commit d52c72d, which includes e1100fe's GPU-level
balancing for the global policy), written from its algorithm, not its code. Legend: L layers,
E logical experts, N physical experts ("replicas", N >= E: every expert once plus N - E
redundant copies), G groups of experts, nodes, GPUs (the ranks).

Two policies (DeepSeek-V3, section 3.4; EPLB's README):
    hierarchical  (num_groups % num_nodes == 0): pack whole expert groups onto nodes so node
                  loads balance (group-limited routing then keeps a token on few nodes), replicate
                  the hottest experts inside each node, then pack each node's replicas onto its
                  GPUs so GPU loads balance;
    global        (otherwise): the same with one group and one node: replicate over all experts,
                  then pack all replicas onto the GPUs.

Ported exactly, including eplb.py's float32 arithmetic (its `weight.float()`): pack and
replica loads are float32 and pack totals are summed in float32, so on the same loads pymoe
returns eplb.py's arrays (a float64 port can pick another pack where two GPU totals nearly tie).
Group sums are float32 sums; for integer loads (token counts) below 2**24 they are exact, so
they agree with torch's whatever its order of addition.

Ties, pinned: packing visits items by descending load with a *stable* sort (equal loads in
index order) and puts each on the lightest pack that has room, the first such pack on ties;
replication gives the next copy to the expert with the largest load per replica, the first such
expert on ties. eplb.py's sort is torch's unstable sort, whose order for equal loads is
unspecified (on CPU it is stable only up to 16 items); the replicas of one expert always have
equal loads, so on more than 16 items eplb.py's placement of them may differ from pymoe's (an
equally balanced packing: the same pack totals as multisets need not hold, but the rule is
deterministic here).

Bad input is refused, where eplb.py accepts it silently: negative or NaN loads (a NaN expert
would take every redundant replica), sizes that do not divide.
"""
from __future__ import annotations

import numpy as np

from . import _checks


def _loads(name: str, weight: object) -> np.ndarray:
    """weight `[L, n]` checked (finite, non-negative), as float64 if it is float64 and as
    float32 otherwise: the dtype eplb.py's functions compute in for a torch tensor of it."""
    w = np.asarray(weight)
    if w.dtype == np.bool_ or not (np.issubdtype(w.dtype, np.integer)
                                   or np.issubdtype(w.dtype, np.floating)):
        raise TypeError(f"{name}: expected an integer or float array, got dtype {w.dtype}")
    if w.ndim != 2:
        raise ValueError(f"{name}: expected shape [L, n] (layers, items), got {w.shape}")
    if w.size == 0:
        raise ValueError(f"{name}: expected at least one layer and one item, got {w.shape}")
    if np.issubdtype(w.dtype, np.floating) and not np.all(np.isfinite(w)):
        raise ValueError(f"{name}: loads must be finite (got NaN or inf)")
    if np.any(w < 0):
        raise ValueError(f"{name}: loads must be non-negative (got {w.min()})")
    return w.astype(np.float64 if w.dtype == np.float64 else np.float32)


def _divides(what: str, n: int, d: int, d_name: str) -> None:
    if d <= 0 or n % d:
        raise ValueError(f"{what} = {n} is not a multiple of {d_name} = {d}")


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack n items into num_packs packs of n/num_packs items each, balancing pack loads.

    Greedy (longest processing time first): items by descending float32 load (stable), each
    onto the lightest pack with room (the first on ties). Pack totals are summed in float64
    for float64 or integer loads and in float32 otherwise, as eplb.py's are for such a tensor
    (rebalance_experts always passes float32).

    Args:
        weight: `[L, n]` loads (non-negative, finite); n must be a multiple of num_packs.
        num_packs: number of packs.
    Returns:
        pack_index `<int64>[L, n]`: the pack of each item; rank_in_pack `<int64>[L, n]`: its
        position in the pack (the order it was put there, 0 first).
    """
    num_packs = _checks.integer("num_packs", num_packs, low=1)
    raw = np.asarray(weight)
    w = _loads("weight", raw)
    if np.issubdtype(raw.dtype, np.integer):
        w = raw.astype(np.float64)  # eplb.py adds integer loads exactly
    L, n = w.shape
    _divides("the number of items n", n, num_packs, "num_packs")
    per_pack = n // num_packs
    if per_pack == 1:
        return (np.broadcast_to(np.arange(n, dtype=np.int64), (L, n)).copy(),
                np.zeros((L, n), dtype=np.int64))
    pack_index = np.full((L, n), -1, dtype=np.int64)
    rank_in_pack = np.full((L, n), -1, dtype=np.int64)
    order = np.argsort(-w.astype(np.float32), axis=-1, kind="stable")  # [L, n] heaviest first
    for layer in range(L):
        totals = np.zeros(num_packs, dtype=w.dtype)  # [packs]
        counts = np.zeros(num_packs, dtype=np.int64)  # [packs]
        for item in order[layer]:
            room = np.flatnonzero(counts < per_pack)
            pack = int(room[np.argmin(totals[room])])  # lightest with room, first on ties
            pack_index[layer, item] = pack
            rank_in_pack[layer, item] = counts[pack]
            totals[pack] += w[layer, item]
            counts[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_phy: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copy num_log experts into num_phy physical experts, minimising the largest load per copy.

    Physical expert i < num_log is logical expert i; each later one is a copy of the expert with
    the largest load / copies so far (the first such expert on ties), computed in float64 for
    float64 loads and float32 otherwise (eplb.py's dtypes).

    Args:
        weight: `[L, num_log]` loads; num_phy >= num_log.
    Returns:
        phy2log `<int64>[L, num_phy]`: the logical expert of each physical one; rank
        `<int64>[L, num_phy]`: which copy of it (0 = the original); logcnt `<int64>[L, num_log]`:
        copies of each logical expert (>= 1, summing to num_phy).
    """
    w = _loads("weight", weight)
    L, num_log = w.shape
    num_phy = _checks.integer("num_phy", num_phy, low=1)
    if num_phy < num_log:
        raise ValueError(f"num_phy: {num_phy} physical experts cannot hold {num_log} logical ones")
    rows = np.arange(L)
    phy2log = np.broadcast_to(np.arange(num_phy, dtype=np.int64), (L, num_phy)).copy()
    rank = np.zeros((L, num_phy), dtype=np.int64)
    logcnt = np.ones((L, num_log), dtype=np.int64)
    for i in range(num_log, num_phy):
        hot = np.argmax(w / logcnt.astype(w.dtype), axis=-1)  # [L] first maximum
        phy2log[:, i] = hot
        rank[:, i] = logcnt[rows, hot]
        logcnt[rows, hot] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    """Row-wise inverse of a permutation `[R, n]`."""
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def _hierarchical(w: np.ndarray, num_phy: int, num_groups: int, num_nodes: int,
                  num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> phy2log `[L, N]`, phyrank `[L, N]`, logcnt `[L, E]` (float32 loads w `[L, E]`)."""
    L, E = w.shape
    group_size, groups_per_node = E // num_groups, num_groups // num_nodes
    per_node, phy_per_node = E // num_nodes, num_phy // num_nodes
    phy_per_gpu = num_phy // num_gpus
    # 1. groups onto nodes; "mlog" numbers the logical experts node by node
    group_load = w.reshape(L, num_groups, group_size).sum(axis=-1, dtype=np.float32)  # [L, G]
    gpack, grank = balanced_packing(group_load, num_nodes)  # [L, G]
    log2mlog = (((gpack * groups_per_node + grank) * group_size)[:, :, None]
                + np.arange(group_size)).reshape(L, E)  # [L, E]
    mlog2log = _inverse(log2mlog)  # [L, E]
    # 2. replicas inside each node: one row per (layer, node)
    mlog_load = np.take_along_axis(w, mlog2log, axis=-1).reshape(L * num_nodes, per_node)
    phy2mlog, phyrank, mlogcnt = replicate_experts(mlog_load, phy_per_node)  # [L*nodes, .]
    # 3. each node's replicas onto its GPUs by load per replica
    phy_load = np.take_along_axis(mlog_load / mlogcnt.astype(np.float32), phy2mlog, axis=-1)
    pack, rank_in_pack = balanced_packing(phy_load, num_gpus // num_nodes)
    pphy2phy = _inverse(pack * phy_per_gpu + rank_in_pack)  # [L*nodes, phy_per_node]
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=-1).reshape(L, num_nodes, -1)
    pphy2mlog = (pphy2mlog + (np.arange(num_nodes) * per_node)[None, :, None]).reshape(L, -1)
    phy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=-1)  # [L, N]
    rank = np.take_along_axis(phyrank, pphy2phy, axis=-1).reshape(L, -1)  # [L, N]
    logcnt = np.take_along_axis(mlogcnt.reshape(L, -1), log2mlog, axis=-1)  # [L, E]
    return phy2log, rank, logcnt


def rebalance_experts(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Place num_replicas physical experts on num_gpus GPUs (module docstring: the policies).

    Args:
        weight: `[L, E]` (or `[E]`, one layer) load of each logical expert, e.g. tokens routed
            to it (a moving average); finite and non-negative.
        num_replicas: N physical experts, a multiple of num_gpus, >= E.
        num_groups: expert groups (of group-limited routing); the hierarchical policy runs when
            num_nodes divides it (then E must be a multiple of num_groups).
        num_nodes: nodes; num_gpus must be a multiple of it.
        num_gpus: GPUs (ranks); GPU g holds physical experts [g*N/num_gpus, (g+1)*N/num_gpus).
    Returns:
        phy2log `<int64>[L, N]`: the logical expert of each physical slot;
        log2phy `<int64>[L, E, R]`: log2phy[l, e, r] the slot of replica r of expert e, -1 for
            r >= logcnt[l, e]; R = logcnt.max() over all layers;
        logcnt `<int64>[L, E]`: replicas of each logical expert (>= 1, summing to N).
    """
    w = _loads("weight", np.asarray(weight)[None] if np.ndim(weight) == 1 else weight)
    w = w.astype(np.float32)  # eplb.py's weight.float()
    L, E = w.shape
    num_replicas = _checks.integer("num_replicas", num_replicas, low=1)
    num_groups = _checks.integer("num_groups", num_groups, low=1)
    num_nodes = _checks.integer("num_nodes", num_nodes, low=1)
    num_gpus = _checks.integer("num_gpus", num_gpus, low=1)
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus: {num_gpus} GPUs is not a multiple of num_nodes = {num_nodes}")
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas: {num_replicas} replicas is not a multiple of "
                         f"num_gpus = {num_gpus} (every GPU holds the same number)")
    if num_replicas < E:
        raise ValueError(f"num_replicas: {num_replicas} replicas cannot hold E = {E} experts "
                         "(every expert needs at least one)")
    if num_groups % num_nodes == 0:
        if E % num_groups:
            raise ValueError(f"num_groups: E = {E} experts cannot form {num_groups} equal groups")
        phy2log, rank, logcnt = _hierarchical(w, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, rank, logcnt = _hierarchical(w, num_replicas, 1, 1, num_gpus)
    R = int(logcnt.max())
    log2phy = np.full((L, E * R), -1, dtype=np.int64)
    np.put_along_axis(log2phy, phy2log * R + rank,
                      np.broadcast_to(np.arange(num_replicas, dtype=np.int64), phy2log.shape), axis=1)
    return phy2log, log2phy.reshape(L, E, R), logcnt


def gpu_loads(weight: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """`[L, num_gpus]` load of each GPU when expert e's load is split evenly over its replicas
    (float64; weight `[L, E]`, phy2log `[L, N]`); without replication pass
    phy2log = arange(E) broadcast to `[L, E]`."""
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim == 1:
        w = w[None]
    p2l = np.asarray(phy2log)
    if p2l.ndim == 1:
        p2l = p2l[None]
    L, N = p2l.shape
    _divides("the number of physical experts", N, num_gpus, "num_gpus")
    cnt = np.stack([np.bincount(p2l[i], minlength=w.shape[1]) for i in range(L)])  # [L, E]
    per_phy = np.take_along_axis(w / np.maximum(cnt, 1), p2l, axis=-1)  # [L, N]
    return per_phy.reshape(L, num_gpus, -1).sum(axis=-1)
