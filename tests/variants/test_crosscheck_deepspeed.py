"""Cross-check: the deepspeed-top1/-top2/-topk presets against DeepSpeed's own gating functions
(deepspeed.moe.sharded_moe.top1gating, top2gating, topkgating), on CPU.

They take the logits and return (l_aux, combine_weights [T, E, C], dispatch_mask, exp_counts);
they compute in float32 only ("everything is in fp32 in this function"; float64 logits fail in
their einsum), so only float32 is compared. docs/conventions.md says what each one does.
"""
from __future__ import annotations

import numpy as np
import pytest

from crosscheck import CASES, Outcome, assert_same, aux_tol, ours, tied_logits
from helpers import import_optional

torch = import_optional("torch", "crosscheck")
sharded_moe = import_optional("deepspeed.moe.sharded_moe", "crosscheck")

T, E = 48, 8
MIN_CAPACITY = 4  # deepspeed.moe.layer.MoE's default, the presets' too


def _outcome(res, chosen: np.ndarray) -> Outcome:
    l_aux, combine = res[0], res[1].double().numpy()  # [T, E, C]
    gate = combine.sum(axis=2)  # [T, E]: one slot per kept pair
    kept = (combine != 0).any(axis=2)
    return Outcome(chosen, kept, gate, combine, float(l_aux), combine.shape[2])


def _chosen(free) -> np.ndarray:
    """The chosen pairs, from the function's own dropless run (drop_tokens=False keeps all)."""
    return (free[1] != 0).any(dim=2).numpy()


def ds_top1(logits: np.ndarray, capacity_factor: float | None, *, rts: bool,
            min_capacity: int = MIN_CAPACITY) -> Outcome:
    x = torch.from_numpy(logits)
    free = sharded_moe.top1gating(x.clone(), 1.0, min_capacity, use_rts=False, drop_tokens=False)
    if capacity_factor is None:
        return _outcome(free, _chosen(free))
    return _outcome(sharded_moe.top1gating(x.clone(), capacity_factor, min_capacity, use_rts=rts),
                    _chosen(free))


def ds_top2(logits: np.ndarray, capacity_factor: float | None) -> Outcome:
    """top2gating with top2_2nd_expert_sampling=False (the preset does not sample)."""
    x = torch.from_numpy(logits)
    free = sharded_moe.top2gating(x.clone(), 1.0, MIN_CAPACITY, drop_tokens=False,
                                  top2_2nd_expert_sampling=False)
    if capacity_factor is None:
        return _outcome(free, _chosen(free))
    return _outcome(sharded_moe.top2gating(x.clone(), capacity_factor, MIN_CAPACITY,
                                           top2_2nd_expert_sampling=False), _chosen(free))


def ds_topk(logits: np.ndarray, k: int, capacity_factor: float | None) -> Outcome:
    x = torch.from_numpy(logits)
    free = sharded_moe.topkgating(x.clone(), k, 1.0, MIN_CAPACITY, drop_tokens=False)
    if capacity_factor is None:
        return _outcome(free, _chosen(free))
    return _outcome(sharded_moe.topkgating(x.clone(), k, capacity_factor, MIN_CAPACITY),
                    _chosen(free))


# ------------------------------------------------------------------------------- top-1

@pytest.mark.parametrize("case", list(CASES))
def test_top1_without_drops(case):
    """No drop (dropless, or capacity above every load): pairs, gates and aux loss agree under the
    preset; the slots agree too with the preset's random priority replaced by token order (RTS
    keeps a random subset but fills slots in token order; pymoe fills them in its drawn order)."""
    logits = CASES[case](T, E, np.float32)
    for cf in (None, 8.0):
        theirs = ds_top1(logits, cf, rts=True)
        mine = ours("deepspeed-top1", logits, 1, cf)
        mine.combine = theirs.combine = None
        assert_same(mine, theirs, np.float32, "deepspeed-top1")
        assert_same(ours("deepspeed-top1", logits, 1, cf, priority="choice"),
                    ds_top1(logits, cf, rts=False), np.float32, "deepspeed-top1")


@pytest.mark.parametrize("case", ["skewed", "ties"])
def test_top1_random_token_selection(case):
    """With drops, random token selection keeps min(load, C) tokens per expert, a random subset,
    in DeepSpeed and in the preset (different random numbers, so different subsets)."""
    logits = CASES[case](T, E, np.float32)
    theirs = ds_top1(logits, 1.0, rts=True)
    mine = ours("deepspeed-top1", logits, 1, 1.0)
    assert theirs.capacity == mine.capacity == 6
    np.testing.assert_array_equal(theirs.chosen, mine.chosen)
    np.testing.assert_array_equal(theirs.kept.sum(axis=0), mine.kept.sum(axis=0))
    assert (theirs.kept <= theirs.chosen).all() and (mine.kept <= mine.chosen).all()
    assert mine.kept.sum() < mine.chosen.sum()  # the case drops something
    both = mine.kept & theirs.kept  # where both kept a pair, the gate is the same probability
    assert abs(mine.gate[both] - theirs.gate[both]).max() <= 1e-6
    assert abs(mine.aux - theirs.aux) <= aux_tol(np.float32, T) * max(1.0, abs(theirs.aux))


def test_top1_without_rts_keeps_an_unspecified_subset():
    """Known difference (docs/conventions.md, section 11): without RTS, top1gating picks the kept
    tokens with torch.topk over the 0/1 expert mask along tokens, so equal entries decide, in an
    order torch does not document; GShard's rule, and pymoe's priority="choice", keeps the first
    C tokens. Literal case (torch 2.13): 21 tokens all choosing expert 0 of 2, capacity 4."""
    logits = np.tile(np.array([[1.0, 0.0]], np.float32), (21, 1))
    theirs = ds_top1(logits, 4 * 2 / 21, rts=False, min_capacity=0)
    mine = ours("deepspeed-top1", logits, 1, 4 * 2 / 21, min_capacity=0, priority="choice")
    assert theirs.capacity == mine.capacity == 4
    assert np.flatnonzero(mine.kept[:, 0]).tolist() == [0, 1, 2, 3]
    assert np.flatnonzero(theirs.kept[:, 0]).tolist() != [0, 1, 2, 3]  # torch's pick instead
    assert theirs.kept[:, 0].sum() == 4


# ------------------------------------------------------------------------- top-2, top-K

@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("cf", [None, 1.0, 0.5])
def test_top2(case, cf):
    """Every pair, slot, gate (renormalised over the survivors) and the first-choice aux loss."""
    logits = CASES[case](T, E, np.float32)
    theirs = ds_top2(logits, cf)
    if case == "skewed" and cf is not None:
        assert not theirs.kept[theirs.chosen].all()  # the case drops something
    assert_same(ours("deepspeed-top2", logits, 2, cf), theirs, np.float32, "deepspeed-top2")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("k", [2, 3])
def test_topk(case, k):
    """topkgating with its default drop_policy="probs". On the tie case (equal probabilities
    compete for the last slots, and torch.topk's pick among equal values is undocumented) only
    dropless; the other cases drop."""
    if case == "ties":
        logits, factors = tied_logits(T, E, np.float32, k=k), (None,)
    else:
        logits, factors = CASES[case](T, E, np.float32), (None, 1.0, 0.5)
    for cf in factors:
        theirs = ds_topk(logits, k, cf)
        if case == "skewed" and cf is not None:
            assert not theirs.kept[theirs.chosen].all()
        assert_same(ours("deepspeed-topk", logits, k, cf), theirs, np.float32, "deepspeed-topk")
