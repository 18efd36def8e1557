"""The routing keywords of route() and MoELayer, checked once into a RouteOptions.

Every keyword is a variant of one routing step (docs/variants.md lists which
system uses which); the defaults are the original pymoe routing, so leaving them out changes
nothing.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _checks
from .capacity import capacity_args
from .losses import LOAD_BALANCING
from .scores import SCORES
from .sinkhorn import SINKHORN_ITERATIONS
from .slots import DROP_POLICIES
from .topk import SECOND_EXPERT_POLICIES

PRIORITIES = ("choice", "score", "token", "random")
SELECTIONS = ("tokens", "experts", "sinkhorn")


@dataclass(frozen=True)
class RouteOptions:
    """Everything route() needs besides the logits, the expert bias and the random generator."""
    k: int
    capacity_factor: float | None = 1.25
    min_capacity: int = 0
    normalize: bool = False
    priority: str = "choice"
    score: str = "softmax"
    num_groups: int | None = None
    topk_groups: int | None = None
    group_score_k: int | None = None
    scaling_factor: float | None = None
    drop_policy: str = "position"
    renormalize_after_drop: bool = False
    selection: str = "tokens"
    capacity_rule: str = "k_ceil"
    capacity: int | None = None
    load_balancing: str = "switch"
    sequence_length: int | None = None
    second_expert_policy: str = "all"
    second_expert_threshold: float = 0.2
    sinkhorn_iterations: int = SINKHORN_ITERATIONS

    @property
    def random(self) -> bool:
        """Whether routing draws random numbers (and so needs a seed or a generator)."""
        return self.priority == "random" or self.second_expert_policy == "random"


def route_options(num_experts: int, k: object, capacity_factor: object = 1.25, *,
                  min_capacity: object = 0, normalize: object = False, priority: object = "choice",
                  score: object = "softmax", num_groups: object = None,
                  topk_groups: object = None, group_score_k: object = None,
                  scaling_factor: object = None, drop_policy: object = "position",
                  renormalize_after_drop: object = False, selection: object = "tokens",
                  capacity_rule: object = "k_ceil", capacity: object = None,
                  load_balancing: object = "switch", sequence_length: object = None,
                  second_expert_policy: object = "all", second_expert_threshold: object = 0.2,
                  sinkhorn_iterations: object = SINKHORN_ITERATIONS) -> RouteOptions:
    """Check every routing keyword against E and each other; each error names its argument."""
    E = num_experts
    k = _checks.integer("k", k, low=1, high=E)
    cf, min_c, rule, fixed = capacity_args(capacity_factor, min_capacity, capacity_rule, capacity)
    opts: dict[str, Any] = dict(
        capacity_factor=cf, min_capacity=min_c, capacity_rule=rule, capacity=fixed,
        normalize=_checks.boolean("normalize", normalize),
        priority=_checks.choice("priority", priority, PRIORITIES),
        score=_checks.choice("score", score, SCORES),
        scaling_factor=_checks.positive_finite("scaling_factor", scaling_factor, allow_none=True),
        drop_policy=_checks.choice("drop_policy", drop_policy, DROP_POLICIES),
        renormalize_after_drop=_checks.boolean("renormalize_after_drop", renormalize_after_drop),
        selection=_checks.choice("selection", selection, SELECTIONS),
        load_balancing=_checks.choice("load_balancing", load_balancing, LOAD_BALANCING),
        second_expert_policy=_checks.choice("second_expert_policy", second_expert_policy,
                                            SECOND_EXPERT_POLICIES),
        second_expert_threshold=_checks.positive_finite("second_expert_threshold",
                                                        second_expert_threshold),
        sinkhorn_iterations=_checks.integer("sinkhorn_iterations", sinkhorn_iterations, low=1),
    )
    opts.update(_group_options(E, k, num_groups, topk_groups, group_score_k))
    if opts["load_balancing"] == "sequence":
        if sequence_length is None:
            raise ValueError("sequence_length: required with load_balancing='sequence' (tokens "
                             "per sequence; T must be a multiple of it)")
        opts["sequence_length"] = _checks.integer("sequence_length", sequence_length, low=1)
    elif sequence_length is not None:
        raise ValueError("sequence_length: only used with load_balancing='sequence'")
    if opts["second_expert_policy"] != "all" and k != 2:
        raise ValueError(f"second_expert_policy: {opts['second_expert_policy']!r} is GShard's "
                         f"top-2 policy and needs k = 2, got k = {k}")
    if opts["selection"] != "tokens":
        sel = opts["selection"]
        if opts.get("num_groups") is not None:
            raise ValueError(f"num_groups: group-limited top-K needs selection='tokens', got {sel!r}")
        if opts["second_expert_policy"] != "all":
            raise ValueError(f"second_expert_policy: needs selection='tokens', got {sel!r}")
    if opts["selection"] == "experts":
        if opts["capacity_factor"] is None and opts["capacity"] is None:
            raise ValueError("capacity_factor: expert choice needs a capacity (each expert takes "
                             "its top-C tokens); got None (dropless)")
        if opts["priority"] not in ("choice", "token") or opts["drop_policy"] != "position":
            raise ValueError("priority: expert choice fills slots in token order by its own rule "
                             "(each expert's top-C tokens); leave priority and drop_policy at "
                             "their defaults")
    return RouteOptions(k=k, **opts)


def _group_options(E: int, k: int, num_groups: object, topk_groups: object,
                   group_score_k: object) -> dict:
    if num_groups is None:
        if topk_groups is not None or group_score_k is not None:
            raise ValueError("num_groups: required when topk_groups or group_score_k is given")
        return {}
    G = _checks.integer("num_groups", num_groups, low=1)
    if E % G:
        raise ValueError(f"num_groups: must divide the number of experts E = {E}, got {G}")
    if topk_groups is None:
        raise ValueError("topk_groups: required with num_groups (how many groups each token "
                         "may use)")
    tg = _checks.integer("topk_groups", topk_groups, low=1, high=G)
    if tg * (E // G) < k:
        raise ValueError(f"topk_groups: {tg} groups of {E // G} experts hold fewer than k = {k} "
                         "experts (need topk_groups * E / num_groups >= k)")
    if group_score_k is None:
        gk = max(k // tg, 1)
    else:
        gk = _checks.integer("group_score_k", group_score_k, low=1, high=E // G)
    return dict(num_groups=G, topk_groups=tg, group_score_k=min(gk, E // G))


def expert_bias_arg(expert_bias: object, num_experts: int) -> np.ndarray | None:
    """expert_bias: None or a finite float array of shape [E]."""
    if expert_bias is None:
        return None
    return _checks.float_array("expert_bias", expert_bias, ndim=1, shape=(num_experts,))


def generator_arg(seed: object, needed: bool) -> np.random.Generator | None:
    """seed: None, an int >= 0 or a numpy Generator; required when routing is random."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        if needed:
            raise ValueError("seed: priority='random' and second_expert_policy='random' draw "
                             "random numbers; pass an int seed or a numpy Generator")
        return None
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed: expected an int, a numpy Generator or None, got "
                        f"{type(seed).__name__}")
    return np.random.default_rng(_checks.integer("seed", seed, low=0))
