"""Step 3 variant: group-limited top-K (DeepSeek-V2/V3 device/node-limited routing).

Experts 0..E-1 form num_groups contiguous groups of E / num_groups (a group is a device or a
node in expert parallelism). Each token first keeps its best topk_groups groups, then takes its
top-K experts inside them, so its K experts live on at most topk_groups devices.
"""
from __future__ import annotations

from typing import Any

import numpy as np

# a pymoe.options.RouteOptions (not imported: pymoe.options imports this module)
Options = Any


def group_scores(scores: np.ndarray, num_groups: int, group_score_k: int) -> np.ndarray:
    """Score each expert group by the sum of its best group_score_k expert scores.

    Args:
        scores: `[T, E]` selection scores (scores + expert bias), E divisible by num_groups.
        group_score_k: how many of a group's best scores count: DeepSeek-V3 uses 2,
            Megatron-Core K // topk_groups.
    Returns:
        `[T, G]` with G = num_groups.
    """
    T, E = scores.shape
    grouped = scores.reshape(T, num_groups, E // num_groups)  # [T, G, E/G]
    best = -np.sort(-grouped, axis=-1)[..., :group_score_k]  # [T, G, group_score_k]
    return best.sum(axis=-1)  # [T, G]


def limit_to_groups(scores: np.ndarray, num_groups: int, topk_groups: int,
                    group_score_k: int, fill: float = -np.inf) -> np.ndarray:
    """Mask every expert outside a token's best topk_groups groups.

    Args:
        scores: `[T, E]` selection scores.
    Returns:
        `[T, E]` scores with the experts of unselected groups set to `fill`: -inf (as
        Megatron-Core and HF DeepSeek-V3 in transformers 5.x do), so that top_k only picks inside
        the kept groups; axk2 fills 0.0, so a dropped expert (ties: the lowest index) still beats
        a kept one whose score + bias is below 0.
        Groups tie to the lower group index. Which groups win passes no gradient (selection is
        piecewise constant).
    """
    T, E = scores.shape
    g = group_scores(scores, num_groups, group_score_k)  # [T, G]
    best_groups = np.argsort(-g, axis=-1, kind="stable")[:, :topk_groups]  # [T, topk_groups]
    keep = np.zeros((T, num_groups), dtype=bool)  # [T, G]
    np.put_along_axis(keep, best_groups, True, axis=-1)
    keep_expert = np.repeat(keep, E // num_groups, axis=-1)  # [T, E]
    return np.where(keep_expert, scores, fill)


def grouped(opts: Options) -> bool:
    """Whether the options ask for group-limited top-K."""
    return opts.num_groups is not None


def group_settings(opts: Options | None) -> tuple[int, int, int]:
    """(G, groups per token, experts summed per group score) of a routing's options; a ValueError
    for a routing made without groups (pymoe.viz.group_limited_picture)."""
    if opts is None or opts.num_groups is None:
        raise ValueError("routing: expected a routing made with num_groups and topk_groups")
    # route_options sets topk_groups and group_score_k whenever num_groups is set
    assert opts.topk_groups is not None and opts.group_score_k is not None
    return opts.num_groups, opts.topk_groups, opts.group_score_k


def limit_for(scores: np.ndarray, opts: Options) -> np.ndarray:
    """limit_to_groups with the options' group keywords; the scores themselves without groups."""
    if not grouped(opts):
        return scores
    return limit_to_groups(scores, *group_settings(opts), fill=opts.group_fill)
