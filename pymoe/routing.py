"""route(): steps 2-10 and 12 in order, returning everything a layer, a plot or a test needs."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from . import _checks
from .backend import get_backend
from .capacity import capacity_for, drop, expert_load, slot_owner
from .dense import dense_tensors
from .losses import (
    aux_loss_scores,
    aux_loss_scores_backward,
    balance_loss,
    balance_loss_backward,
    load_balancing_loss,
    load_balancing_loss_backward,
    load_balancing_loss_from_sums,
    router_z_loss_backward,
    router_z_loss_from_lse,
)
from .options import (
    PRIORITIES,
    ROUTE_KEYWORDS,
    RouteOptions,
    describe_options,
    expert_bias_arg,
    generator_arg,
    hash_selection,
    hash_table_arg,
    keywords_doc,
    replay_arg,
    route_options,
    split_keywords,
    token_ids_arg,
    token_mask_arg,
)
from .priority import position_in_expert, priority_order
from .router import round_logits, router_dtype, softmax, softmax_backward, softmax_lse
from .slots import assign, assign_for, classic_rule
from .topk import (
    K1_NORMALIZE_WARNING,
    gates_backward_for,
    gates_for,
    plain_normalize,
    renormalize_kept,
    renormalize_kept_backward,
    scale_for,
    second_expert_keep,
    top_k,
    warn_k1_normalize,
)
from .variants.expert_choice import expert_choice_keep, expert_choice_pairs
from .variants.group_limited import grouped, limit_for
from .variants.presets import Preset, accepts_preset
from .variants.relu_routing import (
    l1_balance_loss,
    l1_balance_loss_backward,
    relu_keep,
    relu_scores,
)
from .variants.scores import (
    dlog_score,
    elementwise_scores,
    elementwise_scores_backward,
    log_scores,
    selection_scores,
    stable_ratios,
    underflowed_rows,
)
from .variants.sinkhorn import sinkhorn
from .variants.sparsemixer import sparsemixer, sparsemixer_backward, sparsemixer_gates
from .variants.top_p import ragged_balance_loss, ragged_balance_loss_backward, top_p_keep

__all__ = ["PRIORITIES", "ROUTE_BACKENDS", "Routing", "route", "route_backward",
           "route_unchecked", "K1_NORMALIZE_WARNING"]

ROUTE_BACKENDS = ("numpy", "c", "auto")


@dataclass(eq=False)
class Routing:
    """The result of routing T tokens to E experts with K choices each and capacity C.

    Index form (what fast paths use) and, on demand, mask form (what the dense einsums use).
    Every array in it is read-only (writing raises ValueError): the derived views are computed
    once, on first use, and must stay consistent with the arrays they came from. With expert-choice
    selection K = E: every token lists every expert, and position is -1 where an expert did not
    take the token. Every routing keyword also reads as an attribute (r.priority is
    r.options.priority).
    """
    router_logits: np.ndarray  # [T, E] in the router dtype (>= float32)
    probs: np.ndarray  # [T, E] router scores: softmax over experts, or sigmoid (options.score),
    # or relu(logits) with selection="relu"
    expert_index: np.ndarray  # <int64>[T, K] chosen experts, best first
    token_order: np.ndarray  # <int64>[T] priority order in which tokens claim slots
    position: np.ndarray  # <int64>[T, K] slot inside the expert, -1 where dropped
    gate_before_drop: np.ndarray  # [T, K] gate values at selection (scaled)
    gate: np.ndarray  # [T, K] gate values, 0 where dropped
    kept: np.ndarray  # <bool>[T, K] True where the pair got a slot
    capacity: int  # C, slots per expert
    expert_load: np.ndarray  # <int64>[E] competing assignments per expert before dropping
    aux_loss: float  # load-balancing loss (losses.balance_loss)
    z_loss: float  # router z-loss (losses.router_z_loss)
    options: RouteOptions = field(repr=False)  # every routing keyword
    expert_bias: np.ndarray | None = field(default=None, repr=False)  # [E] used for selection
    # <bool>[T] True = a real token (route(..., token_mask=)); None: every token is real. Padding
    # rows are in no statistic (aux_loss, z_loss, expert_load, the drop fractions) and get no
    # gradient; options.padding says whether they were routed.
    token_mask: np.ndarray | None = field(default=None, repr=False)
    _slot_owner: np.ndarray | None = field(default=None, repr=False)  # from a backend, or lazy
    # <bool>[T, K] the pairs each token took when K varies per token (top_p: variants.top_p);
    # an unselected pair has position -1 and gate 0 and is in no load. None: every pair.
    selected: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if isinstance(value, np.ndarray):
                setattr(self, name, _read_only(value))

    def __getattr__(self, name: str) -> Any:  # only for names that are not fields
        if name in ROUTE_KEYWORDS and "options" in self.__dict__:
            return getattr(self.__dict__["options"], name)
        raise AttributeError(f"'Routing' object has no attribute {name!r}")

    def __repr__(self) -> str:
        """A few lines of what routing did; the arrays are the fields (r.expert_index, ...)."""
        T, E, K = self.num_tokens, self.num_experts, self.k
        kept = int(np.count_nonzero(self._real_kept))
        load = np.array2string(np.asarray(self.expert_load), threshold=16, edgeitems=4)
        n = self.num_real_tokens
        sel = self.selected
        pairs = n * K if sel is None else int(np.count_nonzero(
            sel if self.token_mask is None else sel & self.token_mask[:, None]))
        real = "" if self.token_mask is None else f", {T - n} of them padding"
        return (f"Routing(T={T}{real}, E={E}, K={K}, capacity C={self.capacity}; "
                f"{describe_options(self.options)})\n"
                f"  kept {kept} of {pairs} (token, choice) pairs ({self.dropped_fraction:.1%} "
                f"dropped), {self.tokens_dropped_fraction:.1%} of tokens lost every choice\n"
                f"  expert_load {load} (before dropping)\n"
                f"  aux_loss {self.aux_loss:.6g}, z_loss {self.z_loss:.6g}; arrays: router_logits, "
                "probs, expert_index, position, gate, kept, ... (help(pymoe.Routing))")

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
        return _read_only(expert_load(self.expert_index[self._real_kept], self.num_experts))

    @property
    def _real_kept(self) -> np.ndarray:
        """`<bool>[T, K]` kept pairs of real tokens (kept itself without a token_mask)."""
        m = self.token_mask
        return self.kept if m is None else self.kept & m[:, None]

    @property
    def num_real_tokens(self) -> int:
        """Tokens that are not padding (T without a token_mask)."""
        m = self.token_mask
        return self.num_tokens if m is None else int(np.count_nonzero(m))

    @property
    def dropped_fraction(self) -> float:
        """Share of the real tokens' (token, choice) assignments that were dropped (0.0 when
        there are none); padding is left out."""
        n = self.num_real_tokens * self.kept.shape[1]
        if self.selected is not None:  # ragged K: of the pairs the tokens took
            sel = self.selected if self.token_mask is None else \
                self.selected & self.token_mask[:, None]
            n = int(np.count_nonzero(sel))
        return float(n - np.count_nonzero(self._real_kept)) / n if n else 0.0

    @property
    def experts_per_token(self) -> np.ndarray:
        """`<int64>[T]` the experts each token took (K everywhere unless K varies: top_p)."""
        if self.selected is None:
            return np.full(self.num_tokens, self.k, dtype=np.int64)
        return np.count_nonzero(self.selected, axis=-1).astype(np.int64)

    @property
    def tokens_dropped_fraction(self) -> float:
        """Share of the real tokens that lost every choice and so get a zero MoE output (0.0
        when there are none); padding is left out."""
        T = self.num_real_tokens
        lost = ~self.kept.any(axis=1) if self.token_mask is None else \
            ~self.kept.any(axis=1) & self.token_mask
        return float(np.count_nonzero(lost)) / T if T else 0.0

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


@accepts_preset(ROUTE_KEYWORDS)
def route(router_logits: np.ndarray, k: int, capacity_factor: float | None = 1.25, *,
          expert_bias: np.ndarray | None = None, seed: int | np.random.Generator | None = None,
          backend: str = "numpy", preset: str | Preset | None = None,
          replay: np.ndarray | None = None, token_mask: np.ndarray | None = None,
          hash_table: np.ndarray | None = None, token_ids: np.ndarray | None = None,
          **keywords: Any) -> Routing:
    """Route T tokens to E experts: scores, top-K, gates, priority, slots, capacity, drop, losses.

    Args (defaults reproduce the original routing; docs/variants.md says who
    uses what):
        router_logits: `[T, E]` float array (computed in at least float32).
        k: K choices per token, 1 <= K <= E.
        capacity_factor: > 0 and finite, or None for dropless routing (capacity.expert_capacity).
        expert_bias: `[E]` added to the scores for choosing only (variants.scores.selection_scores),
            cast to the score dtype first (every backend: docs/variants.md).
        seed: an int or a numpy Generator for priority="random" / second_expert_policy="random"
            (the permutation is drawn first, then the second-expert uniforms).
        backend: who selects the top-K and assigns slots: "numpy" (the reference steps), "c"
            (the C core: the same integers, float results to round-off) or "auto" (C when built).
        preset: a system's name (pymoe.presets()) or a pymoe.Preset: it supplies every keyword
            that is not passed explicitly (docs/conventions.md); then aux_loss is that
            system's load-balancing loss and combine_weights its [T, E, C] combine tensor.
        replay: `<int>[T, K]` a selection recorded earlier (a Routing's expert_index) to force
            instead of step 3 (router replay, pymoe.replay): the gates are the live scores at
            those experts, normalised and scaled as without replay; capacity, drops and the
            losses follow as usual (the aux loss counts the replayed experts); the selection
            passes no gradient, the gates do. Not with selection="experts".
        token_mask: `<bool>[T]`, True = a real token, False = padding (HF attention_mask), or
            None (every token real). Padding is left out of every statistic and gradient; the
            keyword padding says whether it is routed (docs/variants.md, "Padding").
        hash_table, token_ids: hash routing (DeepSeek-V4's first layers, HF `tid2eid`): a
            frozen `<int>[V, K]` token-id -> experts table and the tokens' ids `<int>[T]` in
            [0, V); token t goes to hash_table[token_ids[t]] (a constant, as replay), its gates
            the scores of those experts, normalised and scaled as usual. Not with replay or
            expert_bias (nothing is ranked).
        keywords: the routing keywords of pymoe.options.RouteOptions, checked there:
    """
    (keywords,) = split_keywords("route", keywords, RouteOptions)
    logits = _checks.float_array("router_logits", router_logits, ndim=2, shape=("T", "E"))
    if logits.shape[1] == 0:
        raise ValueError("router_logits: expected at least one expert (E >= 1), got shape "
                         f"{logits.shape}")
    E = logits.shape[1]
    opts = route_options(E, k, capacity_factor, **keywords)
    bias = expert_bias_arg(expert_bias, E)
    rng = generator_arg(seed, opts.random)
    backend = _checks.choice("backend", backend, ROUTE_BACKENDS)
    mask = token_mask_arg(token_mask, logits.shape[:1])
    warn_k1_normalize(opts)
    forced = check_replay(replay, logits.shape[0], opts, E)
    table = hash_table_arg(hash_table, E, opts.k)
    if table is not None and bias is not None:
        raise ValueError("expert_bias: hash routing chooses the experts by token id and ranks "
                         "nothing, so a selection bias would be ignored; leave it None")
    hashed = hash_selection(table, token_ids_arg(token_ids, logits.shape[:1], table), replay)
    if hashed is not None:
        forced = check_replay(hashed, logits.shape[0], opts, E)
    return route_unchecked(logits, opts, expert_bias=bias, rng=rng, backend=get_backend(backend),
                           replay=forced, token_mask=mask)


def check_replay(replay: object, T: int, opts: RouteOptions, E: int) -> np.ndarray | None:
    """options.replay_arg, and the selections replay cannot stand in for."""
    if replay is not None and opts.selection == "experts":
        raise ValueError("replay: expert choice (selection='experts') has no per-token "
                         "selection to replay (every token lists every expert)")
    if replay is not None and (opts.top_p is not None or opts.selection == "relu"):
        raise ValueError("replay: a top_p or selection='relu' routing's K varies per token; a "
                         "[T, K] selection does not record it")
    return replay_arg(replay, T, opts.k, E)


route.__doc__ = (route.__doc__ or "") + keywords_doc(RouteOptions, skip=("k", "capacity_factor")) + (
    "    Returns:\n        a Routing; T = 0 gives empty arrays and zero losses.\n")


def route_unchecked(router_logits: np.ndarray, opts: RouteOptions, *,
                    expert_bias: np.ndarray | None = None, rng: np.random.Generator | None = None,
                    backend=None, replay: np.ndarray | None = None,
                    token_mask: np.ndarray | None = None) -> Routing:
    """route() after its arguments have been checked (MoELayer checks them once, at construction):
    the recipe's steps 2-9 and 12, in order.

    token_mask: a checked `<bool>[T]` or None. padding="absent" routes the real rows alone (so
    they equal route_unchecked(L[m]) bit for bit) and adds the padding rows unrouted;
    "counted" does the same with the capacity formula's T = all T rows; "routed" routes every
    row and takes the statistics over the real rows only (_route).

    backend: None or the NumPy backend runs each step's NumPy function, as written below; a
    compiled backend (C) runs its whole-step twins in their place: Backend.softmax_lse (step 2),
    Backend.top_k (step 3 with step 12's load and probability sums, for a plain top-K) and
    Backend.assign_slots (steps 5-9), held to the NumPy steps by the tests (the same integers).
    replay: a checked `<int64>[T, K]` selection (check_replay) that replaces step 3.
    """
    twin = None if backend is None or backend.name == "numpy" else backend
    if token_mask is None:
        return _route(router_logits, opts, expert_bias, rng, twin, replay=replay)
    if opts.padding == "routed":
        return _route(router_logits, opts, expert_bias, rng, twin, stats_mask=token_mask,
                      replay=replay)
    return _route_real_rows(router_logits, opts, expert_bias, rng, twin, token_mask, replay)


def _route(router_logits: np.ndarray, opts: RouteOptions, expert_bias: np.ndarray | None,
           rng: np.random.Generator | None, twin, capacity_tokens: int | None = None,
           stats_mask: np.ndarray | None = None, replay: np.ndarray | None = None) -> Routing:
    """route_unchecked's steps. capacity_tokens: the T of the capacity formula (None: T);
    stats_mask `<bool>[T]`: take aux_loss, z_loss and expert_load over these rows only;
    replay: the `[T, K]` selection that replaces step 3."""
    # One C-contiguous, native copy: every reduction below then sums in the same order whatever
    # the caller's layout, so the same values always give the same bits (and the same ties).
    logits = np.ascontiguousarray(router_logits, dtype=router_dtype(router_logits.dtype))  # [T, E]
    logits = round_logits(logits, opts.router_dtype)  # [T, E] (router_dtype, pymoe.precision)
    T, E = logits.shape
    if opts.sequence_length is not None and T % opts.sequence_length:
        raise ValueError(f"sequence_length: the {T} tokens are not a whole number of sequences "
                         f"of {opts.sequence_length}")
    # step 2: router scores (and the logsumexp the z-loss needs)
    probs, lse = softmax_lse(logits) if twin is None else twin.softmax_lse(logits)  # [T, E], [T]
    scores = probs if opts.score == "softmax" else elementwise_scores(logits, opts.score)  # [T, E]
    if opts.selection == "relu":  # ReMoE: the gates are relu(logits)
        scores = relu_scores(logits)  # [T, E]
    aux_probs = _aux_probs(scores, logits, opts)  # [T, E]
    if expert_bias is not None and opts.selection == "sparsemixer":
        raise ValueError("expert_bias: selection='sparsemixer' picks by its own rule and ranks "
                         "no biased scores, so a selection bias would be ignored; leave it None")
    if expert_bias is not None:  # one rule for every backend: the bias in the score dtype
        with np.errstate(over="ignore"):
            expert_bias = np.asarray(expert_bias).astype(logits.dtype, copy=False)  # [E]
        if not np.isfinite(expert_bias).all():
            raise ValueError(f"expert_bias: a value overflows {logits.dtype}, the score dtype "
                             "it is added in (docs/variants.md); keep |expert_bias| within it")
    # step 3: choose K experts per token
    sums = None
    mixer_gate = None  # [T, K] SparseMixer's own gates (variants.sparsemixer), steps 3-4 in one
    if replay is not None:  # router replay: the recorded selection, a constant
        expert_index = replay  # [T, K]
        if opts.selection == "sparsemixer":
            mixer_gate = sparsemixer_gates(logits, replay, opts.sparsemixer_eps)
    elif opts.selection == "sparsemixer":
        expert_index, mixer_gate = sparsemixer(logits, opts.k, opts.sparsemixer_eps,
                                               rng if opts.sparsemixer_sampling else None)
    elif twin is not None and opts.selection == "tokens" and not grouped(opts) and \
            np.isfinite(logits).all():  # (a -inf logit: an expert the token may not use)
        ranked = logits if expert_bias is None or opts.expert_bias_on == "logits" else scores
        expert_index, load, prob_sum = twin.top_k(ranked, opts.k, bias=expert_bias,
                                                  probs=aux_probs)  # [T, K]
        sums = (load, prob_sum)
    else:
        expert_index = _select(logits, scores, opts, expert_bias)  # [T, K]
    # step 4: gates
    gate = _gates(scores, logits, expert_index, opts) if mixer_gate is None else mixer_gate
    # step 6: the order in which tokens claim slots (and which pairs compete at all)
    token_order = priority_order(scores, opts.priority, rng)  # [T]
    candidates = None
    if opts.second_expert_policy != "all":
        candidates = second_expert_keep(scores, expert_index, opts.second_expert_policy,
                                        opts.second_expert_threshold, rng)  # [T, K]
    selected = None
    if opts.top_p is not None:  # dynamic K: the unselected pairs never compete (variants.top_p)
        candidates = selected = top_p_keep(probs, expert_index, opts.top_p)  # [T, K]
        gate = np.where(selected, gate, 0).astype(gate.dtype)  # [T, K]
    elif opts.selection == "relu":  # a token's experts are its positive ones (ReMoE)
        candidates = selected = relu_keep(logits, expert_index)  # [T, K]
    # step 8: capacity
    capacity = capacity_for(T if capacity_tokens is None else capacity_tokens, E, expert_index,
                            candidates, opts)
    # steps 5-7 and 9: positions in each expert, drops past capacity, the slot table
    position, owner, load = _slots(twin, expert_index, token_order, capacity, gate, scores,
                                   candidates, opts)  # [T, K], [E, C], [E]
    kept = position >= 0  # [T, K]
    # step 9b: the gates of the kept pairs (renormalised, with that variant)
    final = renormalize_kept(gate, kept) if opts.renormalize_after_drop else \
        np.where(kept, gate, 0).astype(gate.dtype)  # [T, K]
    # step 12: the load-balancing loss (and the z-loss, below)
    z_loss = router_z_loss_from_lse(lse)
    if stats_mask is not None:  # padding="routed": statistics of the real rows only
        listed = stats_mask[:, None] if candidates is None else candidates & stats_mask[:, None]
        load = expert_load(expert_index[np.broadcast_to(listed, expert_index.shape)], E)  # [E]
        aux = masked_balance_loss(aux_probs, expert_index, stats_mask, opts, selected)
        z_loss = router_z_loss_from_lse(lse[stats_mask])
    elif opts.selection == "experts":
        aux = 0.0
    elif selected is not None and opts.load_balancing == "switch":
        aux = _ragged_aux(aux_probs, expert_index, selected, opts)
    elif sums is not None and opts.load_balancing == "switch":
        aux = load_balancing_loss_from_sums(sums[0], sums[1], T, opts.k)  # the same bits
    else:
        aux = balance_loss(aux_probs, expert_index, opts.load_balancing, opts.sequence_length)
    return Routing(router_logits=logits, probs=scores, expert_index=expert_index,
                   token_order=token_order, position=position,
                   gate_before_drop=scale_for(gate, opts),
                   gate=scale_for(final, opts), kept=kept, capacity=capacity,
                   expert_load=load,
                   aux_loss=aux, z_loss=z_loss, options=opts,
                   expert_bias=expert_bias, token_mask=stats_mask, _slot_owner=owner,
                   selected=selected)


def _route_real_rows(router_logits: np.ndarray, opts: RouteOptions,
                     expert_bias: np.ndarray | None, rng: np.random.Generator | None, twin,
                     mask: np.ndarray, replay: np.ndarray | None = None) -> Routing:
    """padding "absent" / "counted": route the real rows L[mask] on their own (the capacity
    formula's T is every row with "counted"), then add the padding rows unrouted: position -1,
    gate 0, the experts they would choose alone in expert_index, after the real tokens in
    token_order. The per-sequence loss needs the sequences' layout, so the real rows are routed
    with the Switch loss and the sequence loss is taken over the real rows of each sequence."""
    logits = np.ascontiguousarray(router_logits, dtype=router_dtype(router_logits.dtype))  # [T, E]
    logits = round_logits(logits, opts.router_dtype)  # [T, E] (idempotent: _route rounds again)
    T, E = logits.shape
    if opts.sequence_length is not None and T % opts.sequence_length:
        raise ValueError(f"sequence_length: the {T} tokens are not a whole number of sequences "
                         f"of {opts.sequence_length}")
    sub_opts = opts
    if opts.load_balancing == "sequence":
        sub_opts = dataclasses.replace(opts, load_balancing="switch", sequence_length=None)
    real, pad = np.flatnonzero(mask), np.flatnonzero(~mask)  # [T_real], [T_pad]
    sub = _route(logits[real], sub_opts, expert_bias, rng, twin,
                 capacity_tokens=T if opts.padding == "counted" else None,
                 replay=None if replay is None else replay[real])
    K = sub.expert_index.shape[1]
    pad_logits = logits[pad]  # [T_pad, E]
    pad_scores = softmax_lse(pad_logits)[0] if opts.score == "softmax" else \
        elementwise_scores(pad_logits, opts.score)
    if opts.selection == "relu":
        pad_scores = relu_scores(pad_logits)  # [T_pad, E]
    bias = None if expert_bias is None else sub.expert_bias

    def full(part: np.ndarray, pad_part: np.ndarray) -> np.ndarray:
        out = np.empty((T,) + part.shape[1:], dtype=part.dtype)
        out[real], out[pad] = part, pad_part
        return out

    pad_index = (_select(pad_logits, pad_scores, opts, bias) if replay is None
                 else replay[pad]).astype(np.int64)  # [T_pad, K]
    zeros = np.zeros((pad.size, K), dtype=sub.gate.dtype)  # [T_pad, K]
    owner = np.array(sub.slot_owner)  # [E, C] pairs t*K + j of the real rows, -1 when empty
    filled = owner >= 0
    owner[filled] = real[owner[filled] // K] * K + owner[filled] % K  # of all T rows
    aux = sub.aux_loss
    if opts.load_balancing == "sequence":
        aux = masked_balance_loss(_aux_probs(full(sub.probs, pad_scores), logits, opts),
                                  full(sub.expert_index, pad_index), mask, opts)
    return Routing(router_logits=logits, probs=full(sub.probs, pad_scores),
                   expert_index=full(sub.expert_index, pad_index),
                   token_order=np.concatenate([real[sub.token_order], pad]),
                   position=full(sub.position, np.full((pad.size, K), -1, np.int64)),
                   gate_before_drop=full(sub.gate_before_drop, zeros),
                   gate=full(sub.gate, zeros), kept=full(sub.kept, zeros.astype(bool)),
                   capacity=sub.capacity, expert_load=sub.expert_load, aux_loss=aux,
                   z_loss=sub.z_loss, options=opts, expert_bias=sub.expert_bias,
                   token_mask=mask, _slot_owner=owner.astype(np.int64),
                   selected=None if sub.selected is None else full(sub.selected,
                                                                   zeros.astype(bool)))


def _ragged_aux(probs: np.ndarray, expert_index: np.ndarray, selected: np.ndarray,
                opts: RouteOptions) -> float:
    """The Switch loss of a ragged selection: top_p's (f over the selected pairs) or ReMoE's L1
    regulariser (f over T * target k)."""
    if opts.selection == "relu":
        return l1_balance_loss(probs, expert_index, selected, opts.k)
    return ragged_balance_loss(probs, expert_index, selected)


def _ragged_aux_backward(probs: np.ndarray, expert_index: np.ndarray, selected: np.ndarray,
                         coef: float, opts: RouteOptions) -> np.ndarray:
    """d (coef * _ragged_aux) / d probs `[T, E]`."""
    if opts.selection == "relu":
        return l1_balance_loss_backward(probs, expert_index, selected, opts.k, coef)
    return ragged_balance_loss_backward(probs, expert_index, selected, coef)


def masked_balance_loss(probs: np.ndarray, expert_index: np.ndarray, mask: np.ndarray,
                        opts: RouteOptions, selected: np.ndarray | None = None) -> float:
    """balance_loss over the real rows: f_e, P_e and their T from the rows where mask is True;
    the per-sequence loss: each sequence's real rows, averaged over the sequences that have any.

    Args: probs `[T, E]` (aux_loss_scores), expert_index `<int>[T, K]`, mask `<bool>[T]`."""
    if opts.selection == "experts":
        return 0.0
    if selected is not None and opts.load_balancing == "switch":
        return _ragged_aux(probs[mask], expert_index[mask], selected[mask], opts)
    if opts.load_balancing != "sequence":
        return balance_loss(probs[mask], expert_index[mask], opts.load_balancing)
    losses = [load_balancing_loss(probs[rows][m], expert_index[rows][m])
              for rows, m in _sequences(mask, opts.sequence_length)]
    return float(np.mean(losses)) if losses else 0.0


def masked_balance_loss_backward(probs: np.ndarray, expert_index: np.ndarray,
                                 mask: np.ndarray, coef: float, opts: RouteOptions,
                                 selected: np.ndarray | None = None) -> np.ndarray:
    """d (coef * masked_balance_loss) / d probs `[T, E]`, 0 in the padding rows."""
    d = np.zeros_like(probs)  # [T, E]
    if selected is not None and opts.load_balancing == "switch":
        d[mask] = _ragged_aux_backward(probs[mask], expert_index[mask], selected[mask], coef,
                                       opts)
        return d
    if opts.load_balancing != "sequence":
        d[mask] = balance_loss_backward(probs[mask], expert_index[mask], coef,
                                        opts.load_balancing)
        return d
    seqs = _sequences(mask, opts.sequence_length)
    for rows, m in seqs:
        block = np.zeros_like(probs[rows])  # [S, E]
        block[m] = load_balancing_loss_backward(probs[rows][m], expert_index[rows][m],
                                                coef / len(seqs))
        d[rows] = block
    return d


def _sequences(mask: np.ndarray, S: int | None) -> list[tuple[slice, np.ndarray]]:
    """(rows, real-row mask `<bool>[S]`) of each sequence of S rows that holds a real token."""
    assert S is not None  # route_options requires it with load_balancing="sequence"
    blocks = [(slice(i, i + S), mask[i:i + S]) for i in range(0, mask.shape[0], S)]
    return [(rows, m) for rows, m in blocks if m.any()]


def skip_route_draws(opts: RouteOptions, T: int, rng: np.random.Generator, groups: int,
                     sizes: list[int] | None = None) -> None:
    """Advance rng past the random numbers route_unchecked draws for `groups` routings of T
    tokens each (the permutation, then the second-expert uniforms): expert parallelism routes
    rank r's group after the r groups before it, as MoELayer(token_groups=P) does in sequence.
    sizes: the tokens each routing draws for instead of T (a masked routing with padding
    "absent" or "counted" draws for its real tokens only)."""
    for n in ([T] * groups if sizes is None else sizes):
        if opts.priority == "random":
            rng.permutation(n)
        if opts.second_expert_policy == "random":
            rng.uniform(size=n)


def _log_scores(logits: np.ndarray, opts: RouteOptions) -> np.ndarray:
    """log of the scores up to a per-token constant (variants.scores.log_scores)."""
    return log_scores(logits, opts.score)


def _gates(scores: np.ndarray, logits: np.ndarray, index: np.ndarray,
           opts: RouteOptions) -> np.ndarray:
    """gates_for; normalised gates of a token whose chosen scores all underflowed (sigmoid scores
    of very negative logits, or softmax probabilities a large expert_bias chose) come from the
    log-scores (variants.scores.stable_ratios), not 0 / 0."""
    with np.errstate(divide="ignore", invalid="ignore"):  # 0 / 0 rows are replaced below
        gate = gates_for(scores, index, opts)  # [T, K]
    if opts.normalize and plain_normalize(opts):
        gate = stable_ratios(gate, np.take_along_axis(scores, index, axis=-1),
                             _log_scores(np.take_along_axis(logits, index, axis=-1), opts))
    return gate


def _aux_probs(scores: np.ndarray, logits: np.ndarray, opts: RouteOptions) -> np.ndarray:
    """aux_loss_scores, sigmoid rows that underflowed taken stably as in _gates."""
    if opts.score == "softmax":
        return scores
    with np.errstate(divide="ignore", invalid="ignore"):  # 0 / 0 rows are replaced below
        aux_probs = aux_loss_scores(scores, opts.score)  # [T, E]
    return stable_ratios(aux_probs, scores, log_scores(logits, opts.score))


def _stable_dlogits(routing: Routing, dgate: np.ndarray, daux: np.ndarray | None,
                    rows: np.ndarray) -> np.ndarray:
    """d logits `[T_rows, E]` of the gate and aux terms for the given rows, written with the
    ratios so that nothing divides by an underflowed sum. For normalised gates g = s_sel / S:
    d l_i = g_i (dg_i - sum_j dg_j g_j) times (1 - s_i) for sigmoid scores (s_i / S = g_i,
    ds_i/dl_i = s_i (1 - s_i)) and times 1 for softmax (g is the softmax of the chosen logits);
    the sigmoid aux loss's q = s / sum_e s_e likewise; softmax's aux term as softmax_backward."""
    opts = routing.options
    s, logits = routing.probs[rows], routing.router_logits[rows]  # [n, E]
    index, dg = routing.expert_index[rows], dgate[rows]  # [n, K]
    s_sel = np.take_along_axis(s, index, axis=-1)  # [n, K]
    sigmoid_score = opts.score != "softmax"  # any elementwise score: d log s / d l below
    if opts.normalize and not plain_normalize(opts):  # (only elementwise-score rows reach here)
        d_sel = np.take_along_axis(gates_backward_for(dg, s, index, opts), index, -1) \
            * s_sel * dlog_score(np.take_along_axis(logits, index, -1), s_sel, opts.score)
    elif opts.normalize:
        g = _gates(s, logits, index, opts)  # [n, K]
        d_sel = g * (dg - (dg * g).sum(axis=-1, keepdims=True))
        if sigmoid_score:
            d_sel = d_sel * dlog_score(np.take_along_axis(logits, index, -1), s_sel, opts.score)
    else:  # elementwise (softmax rows are never bad unnormalised)
        d_sel = dg * s_sel * dlog_score(np.take_along_axis(logits, index, -1), s_sel, opts.score)
    out = np.zeros_like(s)  # [n, E]
    np.put_along_axis(out, index, d_sel.astype(s.dtype), axis=-1)
    if daux is not None:
        da = daux[rows]  # [n, E]
        if sigmoid_score:
            q = _aux_probs(s, logits, opts)  # [n, E]
            out += dlog_score(logits, s, opts.score) * q * (da - (da * q).sum(axis=-1,
                                                                          keepdims=True))
        else:
            out += softmax_backward(da, s)
    return out


def _slots(twin, expert_index: np.ndarray, token_order: np.ndarray, capacity: int,
           gate: np.ndarray, scores: np.ndarray, candidates: np.ndarray | None,
           opts: RouteOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps 5-9: (position `<int64>[T, K]`, -1 where dropped; slot_owner `<int64>[E, C]`;
    expert_load `<int64>[E]` before dropping). The classic rule (choice-major, first C kept) is
    the recipe's cumsum and drop, or the twin's assign_slots; every other slot rule goes through
    slots.assign, the one function every backend shares."""
    E = scores.shape[1]
    backend = get_backend("numpy") if twin is None else twin
    if opts.selection == "experts":
        kept = expert_choice_keep(scores, expert_index, capacity)  # [T, E]
        return assign(backend, expert_index, token_order, E, capacity, priority="token",
                      candidates=kept)
    if not classic_rule(opts, candidates):
        return assign_for(backend, expert_index, token_order, E, capacity, opts, score=gate,
                          candidates=candidates)
    if twin is not None:
        return twin.assign_slots(expert_index, token_order, E, capacity)
    position = position_in_expert(expert_index, E, token_order)  # [T, K]            steps 5-7
    position, _, _ = drop(position, gate, capacity)  # [T, K], -1 past capacity       step 9
    return position, slot_owner(expert_index, position, capacity, E), expert_load(expert_index, E)


def _select(logits: np.ndarray, scores: np.ndarray, opts: RouteOptions,
            expert_bias: np.ndarray | None) -> np.ndarray:
    """Step 3 by selection rule: expert_index `<int64>[T, K]` (K = E for expert choice)."""
    if opts.selection == "experts":
        return expert_choice_pairs(logits)  # [T, E]
    if opts.selection == "sinkhorn":
        return top_k(sinkhorn(logits, opts.sinkhorn_iterations), opts.k)
    if opts.selection == "relu":  # every expert listed; relu_keep marks the positive ones
        return top_k(logits, logits.shape[1])  # [T, E]
    if opts.selection == "sparsemixer":  # the eval picks (padding rows: no draws)
        return sparsemixer(logits, opts.k, opts.sparsemixer_eps)[0]
    if expert_bias is None and not grouped(opts):
        return top_k(logits, opts.k)  # ranks logits: the same order as the scores, but exact
    biased = logits if opts.expert_bias_on == "logits" else scores  # kolibri1: l + b
    ranked = selection_scores(biased, expert_bias)  # [T, E]
    if not np.isfinite(logits).all():  # a -inf logit (MoELayer modality_sets): never chosen,
        ranked = np.where(np.isneginf(logits), -np.inf, ranked)  # whatever its bias
    ranked = limit_for(ranked, opts)  # [T, E]
    return top_k(ranked, opts.k)


def _check_routing(r: Routing) -> None:
    """The arrays route_backward reads still fit together (a Routing's arrays are read-only, but
    its fields can be rebound): shapes, expert range and kept mask, O(T*K + T*E)."""
    probs = _checks.float_array("routing.probs", r.probs, ndim=2, shape=("T", "E"))
    T, E = probs.shape
    expert_index = _checks.index_array("routing.expert_index", r.expert_index,
                                       shape=(T, None), high=E)
    logits = _checks.float_array("routing.router_logits", r.router_logits, ndim=2, shape=(T, E),
                                 finite=False)  # -inf: an expert the token may not use
    if np.isnan(logits).any() or np.isposinf(logits).any():
        raise ValueError("routing.router_logits: expected finite values (or -inf for an expert "
                         "a token may not use), got NaN or +inf")
    kept = np.asarray(r.kept)
    if kept.dtype != np.bool_ or kept.shape != expert_index.shape:
        raise ValueError(f"routing.kept: expected a bool array of shape {expert_index.shape}, "
                         f"got {kept.dtype} {kept.shape}")
    if r.token_mask is not None:
        mask = np.asarray(r.token_mask)
        if mask.dtype != np.bool_ or mask.shape != (T,):
            raise ValueError(f"routing.token_mask: expected a bool array of shape ({T},), got "
                             f"{mask.dtype} {mask.shape}")


def route_backward(routing: Routing, dgate: np.ndarray, aux_loss_coef: float = 0.0,
                   z_loss_coef: float = 0.0) -> np.ndarray:
    """Gradient of  sum(gate * dgate) + aux_loss_coef * aux_loss + z_loss_coef * z_loss.

    Args:
        routing: from route().
        dgate: `[T, K]`, d objective / d gate (entries of dropped pairs are ignored: their gate is
            the constant 0, so selection, expert bias, group choice, positions and drops pass no
            gradient; so are the padding rows of a routing with a token_mask, which are outside
            the objective and get 0: the aux and z-losses are over the real rows).
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
    opts, scores, index, kept = routing.options, routing.probs, routing.expert_index, routing.kept
    mask = routing.token_mask  # [T] or None
    if mask is not None:  # padding rows: outside the objective
        dgate = np.where(mask[:, None], dgate, 0)
        kept = kept & mask[:, None]
    dgate = scale_for(dgate.astype(scores.dtype), opts)  # [T, K]
    if opts.renormalize_after_drop:
        dgate = renormalize_kept_backward(dgate, _gates(scores, routing.router_logits, index,
                                                        opts), kept)
    else:
        dgate = np.where(kept, dgate, 0).astype(scores.dtype)  # [T, K]
    bad = np.zeros(T, dtype=bool)  # tokens whose score sums underflowed: see below
    if opts.normalize and plain_normalize(opts):  # gates_backward divides by the sum squared
        bad |= underflowed_rows(np.take_along_axis(scores, index, -1), squared=True)
    if opts.score != "softmax":
        bad |= underflowed_rows(scores, squared=True)
    mixer = opts.selection == "sparsemixer"  # its gate term goes to the logits directly
    with np.errstate(divide="ignore", invalid="ignore"):  # bad rows are replaced below
        dscores = np.zeros_like(scores) if mixer else gates_backward_for(dgate, scores, index,
                                                                         opts)  # [T, E]
        daux = None
        if aux_loss_coef and opts.selection != "experts":
            aux_probs = _aux_probs(scores, routing.router_logits, opts)
            if mask is not None:
                daux = masked_balance_loss_backward(aux_probs, index, mask, aux_loss_coef, opts,
                                                    routing.selected)
            elif routing.selected is not None and opts.load_balancing == "switch":
                daux = _ragged_aux_backward(aux_probs, index, routing.selected, aux_loss_coef,
                                            opts)  # [T, E]
            else:
                daux = balance_loss_backward(aux_probs, index, aux_loss_coef,
                                             opts.load_balancing, opts.sequence_length)  # [T, E]
            dscores += aux_loss_scores_backward(daux, scores, opts.score)
        if opts.selection == "relu":
            dlogits = dscores * (routing.router_logits > 0)  # [T, E] relu' (0 at 0)
        elif opts.score == "softmax":
            dlogits = softmax_backward(dscores, scores)  # [T, E]
        else:
            dlogits = elementwise_scores_backward(dscores, routing.router_logits, scores,
                                                  opts.score)  # [T, E]
    if bad.any():
        dlogits[bad] = _stable_dlogits(routing, dgate, daux, bad)
    if mixer:
        dlogits += sparsemixer_backward(dgate, routing.router_logits, index,
                                        opts.sparsemixer_eps).astype(dlogits.dtype)
    if z_loss_coef:
        probs = (scores if opts.score == "softmax" and opts.selection != "relu"
                 else softmax(routing.router_logits))  # [T, E]
        if mask is None:
            dlogits += router_z_loss_backward(routing.router_logits, probs, z_loss_coef)
        else:
            dlogits[mask] += router_z_loss_backward(routing.router_logits[mask], probs[mask],
                                                    z_loss_coef)
    if mask is not None:
        dlogits[~mask] = 0  # (their rows of the gate terms are 0 already; this pins it)
    return dlogits
