"""route(): steps 2-10 and 12 in order, returning everything a layer, a plot or a test needs."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from . import _checks
from .backends import get_backend
from .capacity import drop, expert_capacity, expert_load, slot_owner
from .dense import dense_tensors
from .losses import (
    load_balancing_loss,
    load_balancing_loss_backward,
    load_balancing_loss_from_sums,
    router_z_loss_backward,
    router_z_loss_from_lse,
)
from .priority import position_in_expert, priority_order
from .router import router_dtype, softmax_backward, softmax_lse
from .topk import gates, gates_backward, top_k

if TYPE_CHECKING:
    from .backend_api import Backend

PRIORITIES = ("choice", "score")
ROUTE_BACKENDS = ("numpy", "c", "auto")
K1_NORMALIZE_WARNING = (
    "normalize=True with k=1: every gate is exactly 1.0, so the router gets no gradient from the "
    "task loss (only from the aux/z losses). Use normalize=False for Switch-style top-1 routing.")


@dataclass(eq=False)
class Routing:
    """The result of routing T tokens to E experts with K choices each and capacity C.

    Index form (what fast paths use) and, on demand, mask form (what the dense einsums use).
    Every array in it is read-only (writing raises ValueError): the derived views are computed
    once, on first use, and must stay consistent with the arrays they came from.
    """
    router_logits: np.ndarray  # [T, E] in the router dtype (>= float32)
    probs: np.ndarray  # [T, E] softmax over experts
    expert_index: np.ndarray  # <int64>[T, K] chosen experts, best first
    token_order: np.ndarray  # <int64>[T] priority order in which tokens claim slots
    position: np.ndarray  # <int64>[T, K] slot inside the expert, -1 where dropped
    gate_before_drop: np.ndarray  # [T, K] gate values at selection
    gate: np.ndarray  # [T, K] gate values, 0 where dropped
    kept: np.ndarray  # <bool>[T, K] True where the pair got a slot
    capacity: int  # C, slots per expert
    expert_load: np.ndarray  # <int64>[E] assignments per expert before dropping
    normalize: bool
    priority: str
    aux_loss: float  # load-balancing loss (losses.load_balancing_loss)
    z_loss: float  # router z-loss (losses.router_z_loss)
    _slot_owner: np.ndarray | None = field(default=None, repr=False)  # from a backend, or lazy

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if isinstance(value, np.ndarray):
                setattr(self, name, _read_only(value))

    @property
    def num_tokens(self) -> int:
        return self.probs.shape[0]

    @property
    def num_experts(self) -> int:
        return self.probs.shape[1]

    @property
    def k(self) -> int:
        return self.expert_index.shape[1]

    @cached_property
    def expert_load_kept(self) -> np.ndarray:
        """`<int64>[E]` assignments per expert after dropping (= min(expert_load, C))."""
        return _read_only(expert_load(self.expert_index[self.kept], self.num_experts))

    @property
    def dropped_fraction(self) -> float:
        """Share of the T*K (token, choice) assignments that were dropped (0.0 when T = 0)."""
        n = self.kept.size
        return float(n - np.count_nonzero(self.kept)) / n if n else 0.0

    @property
    def tokens_dropped_fraction(self) -> float:
        """Share of tokens that lost every choice and so get a zero MoE output (0.0 when T = 0)."""
        T = self.num_tokens
        return float(np.count_nonzero(~self.kept.any(axis=1))) / T if T else 0.0

    @property
    def slot_owner(self) -> np.ndarray:
        """`<int64>[E, C]`: t*K + j of the pair in each slot, -1 when empty (capacity.slot_owner)."""
        if self._slot_owner is None:
            self._slot_owner = _read_only(slot_owner(self.expert_index, self.position,
                                                     self.capacity, self.num_experts))
        return self._slot_owner

    @cached_property
    def _dense(self) -> tuple[np.ndarray, np.ndarray]:
        mask, weights = dense_tensors(self.expert_index, self.position, self.gate,
                                      self.num_experts, self.capacity)
        return _read_only(mask), _read_only(weights)

    @property
    def dispatch_mask(self) -> np.ndarray:
        """`<bool>[T, E, C]`, True iff token t sits in slot c of expert e (built on first use)."""
        return self._dense[0]

    @property
    def combine_weights(self) -> np.ndarray:
        """`[T, E, C]`, the gate of the assignment in slot (e, c), 0 elsewhere (built on first use)."""
        return self._dense[1]


def _read_only(a: np.ndarray) -> np.ndarray:
    """A read-only view of `a` (the caller's own array, when it is one, stays writeable)."""
    view = a.view()
    view.flags.writeable = False
    return view


def route(router_logits: np.ndarray, k: int, capacity_factor: float | None = 1.25, *,
          min_capacity: int = 0, normalize: bool = False, priority: str = "choice",
          backend: str = "numpy") -> Routing:
    """Route T tokens to E experts: softmax, top-K, gates, priority, positions, capacity, drop, losses.

    Args:
        router_logits: `[T, E]` float array (computed in at least float32).
        k: K choices per token, 1 <= K <= E.
        capacity_factor: > 0 and finite, or None for dropless routing (see expert_capacity).
        min_capacity: lower bound on C (>= 0).
        normalize: renormalise the K gates to sum to 1 (see topk.gates).
        priority: "choice" (choice-major, token order) or "score" (batch-prioritised routing).
        backend: who selects the top-K and assigns slots: "numpy" (the reference steps), "c"
            (the C core: the same integers, float results to round-off) or "auto" (C when built).
    Returns:
        a Routing; T = 0 gives empty arrays and zero losses.
    """
    logits = _checks.float_array("router_logits", router_logits, ndim=2, shape=(None, None))
    if logits.shape[1] == 0:
        raise ValueError("router_logits: expected at least one expert (E >= 1), got shape "
                         f"{logits.shape}")
    k = _checks.integer("k", k, low=1, high=logits.shape[1])
    capacity_factor = _checks.positive_finite("capacity_factor", capacity_factor, allow_none=True)
    min_capacity = _checks.integer("min_capacity", min_capacity, low=0)
    normalize = _checks.boolean("normalize", normalize)
    priority = _checks.choice("priority", priority, PRIORITIES)
    backend = _checks.choice("backend", backend, ROUTE_BACKENDS)
    if normalize and k == 1:
        warnings.warn(K1_NORMALIZE_WARNING, UserWarning, stacklevel=2)
    return route_unchecked(logits, k, capacity_factor, min_capacity, normalize, priority,
                           get_backend(backend))


def route_unchecked(router_logits: np.ndarray, k: int, capacity_factor: float | None,
                    min_capacity: int, normalize: bool, priority: str,
                    backend: Backend | None = None) -> Routing:
    """route() after its arguments have been checked (MoELayer checks them once, at construction).

    backend: None or the NumPy backend runs the reference steps here; another backend (C) selects
    the top-K, counts the load and sums the probabilities (Backend.top_k) and assigns the slots
    (Backend.assign_slots): the same integers (the tests check that it does).
    """
    # One C-contiguous, native copy: every reduction below then sums in the same order whatever
    # the caller's layout, so the same values always give the same bits (and the same ties).
    logits = np.ascontiguousarray(router_logits, dtype=router_dtype(router_logits.dtype))  # [T, E]
    T, E = logits.shape
    fast = backend is not None and backend.name != "numpy"
    probs, lse = softmax_lse(logits)  # [T, E], [T]                           step 2
    if fast:
        expert_index, load, prob_sum = backend.top_k(logits, k, probs=probs)  # step 3
        aux_loss = load_balancing_loss_from_sums(load, prob_sum, T, k)  #        step 12
    else:
        expert_index = top_k(logits, k)  # [T, K]                             step 3
        load = expert_load(expert_index, E)  # [E]
        aux_loss = load_balancing_loss(probs, expert_index)  #                 step 12
    gate = gates(probs, expert_index, normalize)  # [T, K]                   step 4
    token_order = priority_order(probs, priority)  # [T]                     step 6
    capacity = expert_capacity(T, E, k, capacity_factor, min_capacity, load)  # step 8
    owner = None
    if not fast:
        position = position_in_expert(expert_index, E, token_order)  # [T, K]  steps 5-7
        position, gate_kept, kept = drop(position, gate, capacity)  # [T, K]   step 9
    else:  # None = token order, nothing to permute or check
        order = token_order if priority == "score" else None
        position, owner, _ = backend.assign_slots(expert_index, order, E, capacity)
        kept = position >= 0  # [T, K]
        gate_kept = np.where(kept, gate, 0).astype(gate.dtype)  # [T, K]
    return Routing(router_logits=logits, probs=probs, expert_index=expert_index,
                   token_order=token_order, position=position, gate_before_drop=gate,
                   gate=gate_kept, kept=kept, capacity=capacity, expert_load=load,
                   normalize=normalize, priority=priority, aux_loss=aux_loss,
                   z_loss=router_z_loss_from_lse(lse), _slot_owner=owner)


def _check_routing(r: Routing) -> None:
    """The arrays route_backward reads still fit together (a Routing's arrays are read-only, but
    its fields can be rebound): shapes, expert range and kept mask, O(T*K + T*E)."""
    probs = _checks.float_array("routing.probs", r.probs, ndim=2, shape=(None, None))
    T, E = probs.shape
    expert_index = _checks.index_array("routing.expert_index", r.expert_index,
                                       shape=(T, None), high=E)
    _checks.float_array("routing.router_logits", r.router_logits, ndim=2, shape=(T, E))
    kept = np.asarray(r.kept)
    if kept.dtype != np.bool_ or kept.shape != expert_index.shape:
        raise ValueError(f"routing.kept: expected a bool array of shape {expert_index.shape}, "
                         f"got {kept.dtype} {kept.shape}")


def route_backward(routing: Routing, dgate: np.ndarray, aux_loss_coef: float = 0.0,
                   z_loss_coef: float = 0.0) -> np.ndarray:
    """Gradient of  sum(gate * dgate) + aux_loss_coef * aux_loss + z_loss_coef * z_loss.

    Args:
        routing: from route().
        dgate: `[T, K]`, d objective / d gate (entries of dropped pairs are ignored: their gate is
            the constant 0, so selection, positions and drops pass no gradient).
    Returns:
        d router_logits `[T, E]` in the router dtype (a fresh array).
    """
    if not isinstance(routing, Routing):
        raise TypeError(f"routing: expected a pymoe.Routing from route(), got "
                        f"{type(routing).__name__}")
    _check_routing(routing)
    T, K = routing.expert_index.shape
    dgate = _checks.float_array("dgate", dgate, ndim=2, shape=(T, K))
    aux_loss_coef = _checks.nonnegative_finite("aux_loss_coef", aux_loss_coef)
    z_loss_coef = _checks.nonnegative_finite("z_loss_coef", z_loss_coef)
    dgate = np.where(routing.kept, dgate, 0).astype(routing.probs.dtype)  # [T, K]
    dprobs = gates_backward(dgate, routing.probs, routing.expert_index, routing.normalize)
    if aux_loss_coef:
        dprobs += load_balancing_loss_backward(routing.probs, routing.expert_index, aux_loss_coef)
    dlogits = softmax_backward(dprobs, routing.probs)  # [T, E]
    if z_loss_coef:
        dlogits += router_z_loss_backward(routing.router_logits, routing.probs, z_loss_coef)
    return dlogits
