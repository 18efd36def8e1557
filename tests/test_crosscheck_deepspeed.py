"""Cross-check: pymoe against DeepSpeed's own gating functions (deepspeed.moe.sharded_moe), on CPU.

top1gating, top2gating and topkgating take the logits and return (l_aux, combine_weights
[T, E, C], dispatch_mask, exp_counts); they compute in float32 only ("everything is in fp32 in
this function"; float64 logits fail in their einsum), so only float32 is compared.
docs/conventions.md says what each one does.
"""
from __future__ import annotations

import numpy as np

from crosscheck import CASES, Outcome, assert_same, ours
from helpers import import_optional

torch = import_optional("torch", "crosscheck", module_level=True)
sharded_moe = import_optional("deepspeed.moe.sharded_moe", "crosscheck", module_level=True)

T, E = 48, 8


def _outcome(res, chosen: np.ndarray) -> Outcome:
    l_aux, combine = res[0], res[1].double().numpy()  # [T, E, C]
    gate = combine.sum(axis=2)  # [T, E]: one slot per kept pair
    kept = (combine != 0).any(axis=2)
    return Outcome(chosen, kept, gate, combine, float(l_aux), combine.shape[2])


def ds_top1(logits: np.ndarray, capacity_factor: float | None, min_capacity: int) -> Outcome:
    """top1gating without random token selection; the chosen experts come from its own dropless
    run (drop_tokens=False keeps every pair)."""
    x = torch.from_numpy(logits)
    free = sharded_moe.top1gating(x.clone(), 1.0, min_capacity, use_rts=False, drop_tokens=False)
    chosen = (free[1] != 0).any(dim=2).numpy()
    if capacity_factor is None:
        return _outcome(free, chosen)
    return _outcome(sharded_moe.top1gating(x.clone(), capacity_factor, min_capacity,
                                           use_rts=False), chosen)


def test_top1_dropless_and_roomy():
    """No drop (dropless, or capacity above every load): every pair, gate and slot agrees."""
    for make in CASES.values():
        logits = make(T, E, np.float32)
        for cf in (None, 8.0):
            assert_same(ours("deepspeed-top1", logits, 1, cf), ds_top1(logits, cf, 0), np.float32,
                        "deepspeed-top1")


def test_top1_drops_the_same_number_per_expert():
    """With drops and use_rts=False, each expert keeps min(load, C) pairs in DeepSpeed as in
    pymoe; which ones DeepSpeed keeps is torch.topk's pick among equal 0/1 entries (see
    test_top1_without_rts_keeps_an_unspecified_subset)."""
    logits = CASES["skewed"](T, E, np.float32)
    mine, theirs = ours("deepspeed-top1", logits, 1, 1.0), ds_top1(logits, 1.0, 0)
    assert theirs.capacity == mine.capacity == 6
    np.testing.assert_array_equal(theirs.chosen, mine.chosen)
    np.testing.assert_array_equal(theirs.kept.sum(axis=0), mine.kept.sum(axis=0))
    assert (theirs.kept <= theirs.chosen).all()


def test_top1_without_rts_keeps_an_unspecified_subset():
    """Known difference (docs/conventions.md, DeepSpeed): without RTS, top1gating picks the kept
    tokens with torch.topk over the 0/1 expert mask along tokens, so ties among the 1s decide,
    in an order torch does not document; GShard's rule, and pymoe's, keeps the first C tokens.
    Literal case (torch 2.13): 21 tokens all choosing expert 0 of 2, capacity 4."""
    logits = np.tile(np.array([[1.0, 0.0]], np.float32), (21, 1))
    theirs = ds_top1(logits, 4 * 2 / 21, 0)
    mine = ours("deepspeed-top1", logits, 1, 4 * 2 / 21)
    assert theirs.capacity == mine.capacity == 4
    assert np.flatnonzero(mine.kept[:, 0]).tolist() == [0, 1, 2, 3]
    assert np.flatnonzero(theirs.kept[:, 0]).tolist() != [0, 1, 2, 3]  # torch's pick instead
    assert theirs.kept[:, 0].sum() == 4
