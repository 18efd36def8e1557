"""Token groups (the GShard "group"): route each contiguous block of tokens on its own.

GShard splits the batch into G groups and gives every group its own capacity; expert parallelism
does the same with one group per process: each of P ranks routes its own T_local tokens. This
module holds the step that both share, so that one process (MoELayer(token_groups=G), with
LocalExchange) and P processes (pymoe.expert_parallel, with an MPI exchange) run the very same
arithmetic on the very same arrays and agree bit for bit:

    per group g:  route x_g `[T_g, D]` with capacity C_g -> expert_in_g `[E, C_g, D]`
    exchange:     expert e's rows from every group, in group order -> packed `[E, sum C_g, D]`
    experts:      experts_forward on packed (each expert on its filled rows only)
    exchange:     back to the groups -> out_g `[E, C_g, D]`;  y_g = combine(out_g)

The objective and its gradient follow data parallelism (Megatron-Core's convention): group g has
its own objective L_g = sum(y_g * dy_g) + aux_loss_coef * aux_g + z_loss_coef * z_g; dx_g is
dL_g/dx_g, and every parameter gradient is that of the mean (1/G) sum_g L_g: router gradients are
the mean of the groups' router gradients (summed in group order, so the result does not depend on
how groups are spread over processes), expert gradients are the sum of all groups' contributions
divided by G. With G = 1 this is MoELayer's usual objective. Shared experts are token-local:
each group computes its own tokens' shared output, and their parameters, replicated like the
router's, get the mean of the groups' gradients, summed in group order with the router's.

Load statistics for the aux loss (load_stats):
    "local"   each group its own f_e and P_e: aux_g = E sum_e f_e^g P_e^g (what each rank sees);
              the reported aux_loss is the mean over groups.
    "global"  f_e and P_e over all T tokens (counts and probability sums added over groups, as an
              Allreduce does): aux = E sum_e f_e P_e, the aux loss of the whole batch; each group's
              share is aux_g = E sum_e f_e P_e^g, whose mean over groups is aux. With G = 1
              both are the same and computed the "local" way.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from .experts import EXPERT_PARAMS, ExpertsCache, experts_backward, experts_forward
from .router import router_dtype, router_logits_backward, softmax_backward
from .routing import Routing, route_backward

LOAD_STATS = ("local", "global")
T_ = TypeVar("T_")


class PeerFailed(RuntimeError):
    """Raised on every other process when one process's step failed with an exception that is
    not an argument error (ValueError/TypeError, which every process raises alike): the failing
    process re-raises its own exception, the others stop with this one instead of waiting."""


class Exchange(Protocol):
    """Moves expert rows between the groups here and the experts here (a process's view)."""

    num_token_groups: int  # G, all groups, here and elsewhere

    def agree(self, step: str, problem: str | None, fatal: bool = False) -> None:
        """After a local step, before the next exchange: raise the same ValueError on every
        side if any side had a problem (so that no process waits for one that left). fatal:
        the problem is an exception other than ValueError/TypeError (a MemoryError, a
        RuntimeError, KeyboardInterrupt): the side that had it returns (its caller re-raises
        it), every other side raises PeerFailed naming it."""

    def set_loads(self, loads: Sequence[np.ndarray], capacities: Sequence[int]) -> None:
        """This side's groups' filled rows per expert `<int64>[E]` and capacities C_g, for this
        step's exchanges (over MPI: the Alltoall of the counts)."""

    def to_experts(self, blocks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """blocks: this side's groups' `[E, C_g, D]` (rows 0..n_ge-1 of expert e filled).
        -> (packed `[E_here, sum_g C_g, D]`: expert e's rows from every group in group order,
        filled `<int64>[E_here]`)."""

    def from_experts(self, packed: np.ndarray) -> list[np.ndarray]:
        """The way back: packed `[E_here, sum_g C_g, D]` -> this side's groups' `[E, C_g, D]`."""

    def sum_in_group_order(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        """Sum over all G groups of an array each group holds, added in group order 0..G-1."""


def sum_in_order(parts: Sequence[np.ndarray]) -> np.ndarray:
    """parts[0] + parts[1] + ... added left to right (a fixed order: same bits wherever it runs)."""
    acc = np.array(parts[0], copy=True)
    for p in parts[1:]:
        acc += p
    return acc


def pack_rows(blocks: Sequence[np.ndarray], loads: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Expert e's filled rows from every block, in block order.

    Args:
        blocks: `[E, C_g, D]` per group; loads: `<int64>[E]` filled rows per expert per group.
    Returns:
        packed `[E, sum_g C_g, D]` (zero past the filled rows) and filled `<int64>[E]`.
    """
    E, _, D = blocks[0].shape
    packed = np.zeros((E, sum(b.shape[1] for b in blocks), D), dtype=blocks[0].dtype)
    filled = np.zeros(E, dtype=np.int64)
    for blk, n in zip(blocks, loads):
        for e in range(E):
            packed[e, filled[e]:filled[e] + n[e]] = blk[e, :n[e]]
        filled += n
    return packed, filled


def unpack_rows(packed: np.ndarray, loads: Sequence[np.ndarray],
                capacities: Sequence[int]) -> list[np.ndarray]:
    """Inverse of pack_rows: `[E, sum C_g, D]` -> `[E, C_g, D]` per group (zero past the loads)."""
    E, _, D = packed.shape
    out = []
    start = np.zeros(E, dtype=np.int64)
    for n, C in zip(loads, capacities):
        blk = np.zeros((E, C, D), dtype=packed.dtype)
        for e in range(E):
            blk[e, :n[e]] = packed[e, start[e]:start[e] + n[e]]
        start += n
        out.append(blk)
    return out


class LocalExchange:
    """All G groups and all E experts in this process: the exchange is pack_rows / unpack_rows."""

    def __init__(self, num_token_groups: int) -> None:
        self.num_token_groups = num_token_groups
        self._loads: list[np.ndarray] = []
        self._capacities: list[int] = []

    def agree(self, step: str, problem: str | None, fatal: bool = False) -> None:
        pass  # one process: the error is already on its way up

    def set_loads(self, loads: Sequence[np.ndarray], capacities: Sequence[int]) -> None:
        self._loads, self._capacities = list(loads), list(capacities)

    def to_experts(self, blocks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return pack_rows(blocks, self._loads)

    def from_experts(self, packed: np.ndarray) -> list[np.ndarray]:
        return unpack_rows(packed, self._loads, self._capacities)

    def sum_in_group_order(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        return sum_in_order(parts)


@dataclass
class GroupState:
    """One group's forward pass, kept for its backward."""
    x_router: np.ndarray  # [T_g, D] router's (jittered) copy of x_g, router dtype
    noise: np.ndarray | None  # [T_g, D] jitter multipliers, or None
    routing: Routing
    out: np.ndarray | None = None  # [E, C_g, D] expert outputs of this group's slots
    x: np.ndarray | None = None  # [T_g, D] the group's tokens (kept with shared experts)
    shared: Any = None  # the shared experts' cache (layer.shared_forward), or None


@dataclass
class GroupsCache:
    """What backward_groups needs from forward_groups."""
    groups: list[GroupState]
    experts: ExpertsCache
    f_global: np.ndarray | None  # [E] global f_e (load_stats "global"), else None
    exchange: Exchange  # holds this step's loads for the backward exchanges
    times: dict[str, float] = field(default_factory=dict)
    token_mask: np.ndarray | None = None  # <bool>[sum T_g] this side's groups' masks, or None
    real_tokens: float | None = None  # real tokens of all G groups ("global" stats with masks)


def _tick(times: dict[str, float], key: str, t0: float) -> float:
    t = time.perf_counter()
    times[key] = times.get(key, 0.0) + (t - t0)
    return t


def _together(exchange: Exchange, step: str, fn: Callable[[], T_]) -> T_:
    """fn(), a local step; any exception in it stops every process: argument errors (non-finite
    values, say) as the same ValueError everywhere, any other exception (MemoryError,
    KeyboardInterrupt, ...) re-raised here and PeerFailed on the others (Exchange.agree)."""
    try:
        out = fn()
    except (TypeError, ValueError) as err:
        exchange.agree(step, f"{type(err).__name__}: {err}")
        raise
    except BaseException as err:  # shared, then re-raised: no process waits for this one
        exchange.agree(step, f"{type(err).__name__}: {err}", fatal=True)
        raise
    exchange.agree(step, None)
    return out


def load_sums(routing: Routing) -> np.ndarray:
    """`[2E]` (assignments per expert before dropping, sum over tokens of probs): a group's
    share of the global load statistics, in the router dtype (counts are exact there). With a
    token_mask: `[2E + 1]`, over the real tokens, and their count last."""
    m = routing.token_mask
    if m is None:
        return np.concatenate([routing.expert_load.astype(routing.probs.dtype),
                               routing.probs.sum(axis=0)])
    return np.concatenate([routing.expert_load.astype(routing.probs.dtype),
                           routing.probs[m].sum(axis=0),
                           np.array([np.count_nonzero(m)], dtype=routing.probs.dtype)])


def forward_groups(layer, x_blocks: Sequence[np.ndarray], expert_params: dict[str, np.ndarray],
                   exchange: Exchange, load_stats: str, train: bool,
                   times: dict[str, float], masks: Sequence[np.ndarray] | None = None
                   ) -> tuple[list[np.ndarray], GroupsCache, float, float]:
    """Forward of this side's groups.

    Args:
        layer: the MoELayer whose router, routing settings and backend are used.
        x_blocks: this side's groups' tokens `[T_g, D]` in the layer dtype.
        expert_params: w1, b1, w2, b2 of the experts here (`[E_here, ...]`).
        times: accumulates seconds under "routing", "exchange", "experts", "combine".
        masks: this side's groups' token masks `<bool>[T_g]` (True = a real token; every side
            passes masks, or none does), or None. Each group's statistics are over its real
            tokens (the "global" ones over all groups' real tokens); with padding "absent" or
            "counted" y_g is 0 in the padding rows.
    Returns:
        y blocks `[T_g, D]`, the cache, and this side's aux and z loss terms (the mean over its
        groups of aux_g and z_g, see the module docstring).
    """
    t0 = time.perf_counter()

    def route_and_dispatch() -> tuple[list[GroupState], list[np.ndarray]]:
        ms = [None] * len(x_blocks) if masks is None else masks
        states = [GroupState(*layer.route_tokens(xb, train, mb)) for xb, mb in zip(x_blocks, ms)]
        blocks = [layer.backend.dispatch(xb, s.routing.slot_owner, layer.k)
                  for xb, s in zip(x_blocks, states)]  # [E, C_g, D] each
        return states, blocks

    states, blocks = _together(exchange, "routing", route_and_dispatch)
    G = exchange.num_token_groups
    f_global, aux_terms, real_tokens = None, [], None
    if load_stats == "global" and G > 1:  # with one group, global is local (same arithmetic)
        t0 = _tick(times, "routing", t0)
        sums = exchange.sum_in_group_order([load_sums(s.routing) for s in states])  # [2E(+1)]
        t0 = _tick(times, "exchange", t0)
        E, K = layer.num_experts, layer.k
        T: float = states[0].routing.num_tokens * G  # all tokens (the groups are of equal size)
        if masks is not None:  # the real tokens of every group
            T = real_tokens = float(sums[2 * E])
        f_global = sums[:E] / (T * K)
        aux = float(E * np.dot(f_global, sums[E:2 * E] / T))
        aux_terms = [aux] * len(states)
    else:
        aux_terms = [s.routing.aux_loss for s in states]
    t0 = _tick(times, "routing", t0)
    exchange.set_loads([s.routing.expert_load_kept for s in states],
                       [s.routing.capacity for s in states])
    owners = getattr(exchange, "set_slot_owners", None)
    if owners is not None:  # an exchange that sends a token once per node (pymoe.ep_nodes)
        owners([s.routing.slot_owner for s in states])
    packed, filled = exchange.to_experts(blocks)  # [E_here, sum C_g, D]
    t0 = _tick(times, "exchange", t0)
    p = expert_params
    def experts() -> tuple[np.ndarray, ExpertsCache]:
        out, ecache = experts_forward(packed, p["w1"], p["b1"], p["w2"], p["b2"],
                                      layer.expert_form, filled=filled)  # [E_here, sum C_g, D]
        if not np.isfinite(out).all():  # a parameter's NaN is said where the experts are;
            bad = [n for n in EXPERT_PARAMS if not np.isfinite(p[n]).all()]  # an overflow by
            if bad:  # the combine, on the rank of the tokens
                raise layer.nonfinite_error("the expert outputs", tuple(bad), "x", params=p)
        return out, ecache

    out, ecache = _together(exchange, "the experts", experts)
    t0 = _tick(times, "experts", t0)
    outs = exchange.from_experts(out)
    t0 = _tick(times, "exchange", t0)

    shared_params = layer.shared_params()  # {} without shared experts

    def combine() -> list[np.ndarray]:
        ys = []
        for s, o, xb in zip(states, outs, x_blocks):
            s.out = o
            ys.append(layer.backend.combine(o, s.routing.expert_index, s.routing.position,
                                            s.routing.gate.astype(layer.dtype)))  # [T_g, D]
            if shared_params:  # token-local: each group (rank) its own tokens
                y_shared, s.shared = layer.shared_forward(xb, shared_params)  # [T_g, D]
                s.x = xb
                ys[-1] = ys[-1] + y_shared
            m = s.routing.token_mask
            if m is not None and layer.padding != "routed":
                ys[-1] = np.where(m[:, None], ys[-1], 0).astype(layer.dtype, copy=False)
            if not np.isfinite(ys[-1]).all():  # one pass, versus the experts' T*K*D*H
                raise layer.nonfinite_error("the expert outputs", EXPERT_PARAMS + tuple(
                    shared_params), "x", params={**shared_params, **expert_params})
        return ys

    ys = _together(exchange, "the combine", combine)
    _tick(times, "combine", t0)
    z = float(np.mean([s.routing.z_loss for s in states]))
    mask = None if masks is None else np.concatenate(list(masks))
    return (ys, GroupsCache(states, ecache, f_global, exchange, token_mask=mask,
                            real_tokens=real_tokens), float(np.mean(aux_terms)), z)


def _dlogits(layer, s: GroupState, dgate: np.ndarray, f_global: np.ndarray | None,
             cache: GroupsCache | None = None) -> np.ndarray:
    """d L_g / d router_logits `[T_g, E]` of one group."""
    r = s.routing
    if f_global is None:
        return route_backward(r, dgate, layer.aux_loss_coef, layer.z_loss_coef)
    dlogits = route_backward(r, dgate, 0.0, layer.z_loss_coef)
    if layer.aux_loss_coef:  # d(coef * E * sum_e f_e P_e^g)/d probs = coef * E * f_e / T_g
        T, E = r.probs.shape
        if r.token_mask is None:
            daux = np.broadcast_to((layer.aux_loss_coef * E / T) * f_global, (T, E))
        else:  # P_e over the N real tokens of all G groups; the mean over groups: times G / N
            assert cache is not None and cache.real_tokens is not None
            G = cache.exchange.num_token_groups
            row = (layer.aux_loss_coef * E * G / cache.real_tokens) * f_global  # [E]
            daux = np.where(r.token_mask[:, None], row, 0)  # [T_g, E]
        dlogits += softmax_backward(daux.astype(r.probs.dtype), r.probs)
    return dlogits


def backward_groups(layer, cache: GroupsCache, dy_blocks: Sequence[np.ndarray],
                    expert_params: dict[str, np.ndarray], times: dict[str, float]
                    ) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """Backward of forward_groups: (dx blocks `[T_g, D]`, grads of the router and the experts
    here, in the layer dtype; see the module docstring for the objective)."""
    t0 = time.perf_counter()
    exchange = cache.exchange
    G = exchange.num_token_groups
    if cache.token_mask is not None:  # padding rows are outside the objective
        dy_blocks = [dyb if s.routing.token_mask is None else
                     np.where(s.routing.token_mask[:, None], dyb, 0).astype(dyb.dtype)
                     for dyb, s in zip(dy_blocks, cache.groups)]

    def combine_backward() -> tuple[list[np.ndarray], list[np.ndarray]]:
        d_outs, dgates = [], []
        for dyb, s in zip(dy_blocks, cache.groups):
            r = s.routing
            d_outs.append(layer.backend.dispatch(dyb, r.slot_owner, layer.k,
                                                 weight=r.gate.astype(layer.dtype)))  # [E, C_g, D]
            dgates.append(layer.backend.gate_grad(dyb, s.out, r.expert_index, r.position))
        return d_outs, dgates  # [T_g, K] each

    d_outs, dgates = _together(exchange, "the combine's backward", combine_backward)
    t0 = _tick(times, "combine", t0)
    d_packed, _ = exchange.to_experts(d_outs)
    t0 = _tick(times, "exchange", t0)
    p = expert_params
    d_in, eg = _together(exchange, "the experts' backward",
                         lambda: experts_backward(d_packed, p["w1"], p["w2"], cache.experts))
    for g in eg.values():
        g /= G  # the mean objective (1/G) sum_g L_g
    t0 = _tick(times, "experts", t0)
    d_ins = exchange.from_experts(d_in)
    t0 = _tick(times, "exchange", t0)
    rdt = router_dtype(layer.dtype)
    w_router = layer.params["w_router"].astype(rdt, copy=False)

    shared_params = layer.shared_params()  # {} without shared experts
    shapes = {"w_router": w_router.shape, "b_router": w_router.shape[1:],
              **{n: v.shape for n, v in shared_params.items()}}

    def router_backward() -> tuple[list[np.ndarray], list[np.ndarray]]:
        dxs, router_parts = [], []
        for s, dgate, d_in_g, dyb in zip(cache.groups, dgates, d_ins, dy_blocks):
            r = s.routing
            dx = layer.backend.combine(d_in_g, r.expert_index, r.position)  # [T_g, D]
            if not np.isfinite(dgate).all():  # said in the caller's terms, as MoELayer does
                raise layer.nonfinite_error("the gate gradient <dy, expert output>", (), "dy")
            dlogits = _dlogits(layer, s, dgate, cache.f_global, cache)  # [T_g, E]
            dx_router, dw, db = router_logits_backward(dlogits, s.x_router, w_router)
            if s.noise is not None:
                dx_router *= s.noise
            part = {"w_router": dw, "b_router": db}
            if s.shared is not None:  # replicated parameters: summed over groups as the router's
                dx_shared, sg = layer.shared_backward(dyb, s.x, shared_params, s.shared)
                dx = dx + dx_shared
                part.update(sg)
            dxs.append(dx + dx_router.astype(layer.dtype))
            router_parts.append(np.concatenate([part[n].ravel() for n in shapes]))
        return dxs, router_parts

    dxs, router_parts = _together(exchange, "the router's backward", router_backward)
    t0 = _tick(times, "routing", t0)
    router_sum = exchange.sum_in_group_order(router_parts)  # [D*E + E (+ shared)]
    t0 = _tick(times, "exchange", t0)
    router_mean = router_sum / G
    replicated, at = {}, 0
    for n, shape in shapes.items():  # the replicated parameters' mean gradients
        size = int(np.prod(shape))
        replicated[n] = router_mean[at:at + size].reshape(shape)
        at += size
    grads = {"w_router": replicated.pop("w_router"), "b_router": replicated.pop("b_router"), **eg,
             **replicated}
    _tick(times, "routing", t0)
    return dxs, {n: g.astype(layer.dtype, copy=False) for n, g in grads.items()}
