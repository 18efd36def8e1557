"""pymoe.monitor.LoadTracker: loads, CV, MaxVio, dead experts, drop rate and token counts per
layer and step, on literal routings a reader can count by hand."""
from __future__ import annotations

import numpy as np
import pytest

import pymoe
from pymoe.monitor import LoadTracker, coefficient_of_variation, max_violation


def one_hot(experts: list[int], E: int) -> np.ndarray:
    """`[T, E]` logits whose top-1 is experts[t] (3 on that expert, 0 elsewhere)."""
    logits = np.zeros((len(experts), E))
    logits[np.arange(len(experts)), experts] = 3.0
    return logits


def test_literal_measures():
    """E = 4, K = 1, 6 tokens: loads (3, 2, 1, 0); mean 1.5, so MaxVio = 3 / 1.5 - 1 = 1,
    CV = std(3, 2, 1, 0) / 1.5 = sqrt(1.25) / 1.5, 1 dead expert; capacity 2 drops 1 of 6."""
    r = pymoe.route(one_hot([0, 0, 0, 1, 1, 2], 4), 1, 4 * 2 / 6)
    assert r.capacity == 2
    t = LoadTracker()
    s = t.record(r, step=0)
    assert s.load.tolist() == [3, 2, 1, 0] and s.load_kept.tolist() == [2, 2, 1, 0]
    assert s.max_vio == pytest.approx(1.0, abs=1e-15)
    assert s.cv == pytest.approx(np.sqrt(1.25) / 1.5, rel=1e-15)
    assert s.dead == 1 and s.drop_rate == pytest.approx(1 / 6, rel=1e-15)
    assert s.tokens == 6 and s.padding == 0 and s.pairs == 6 and s.routings == 1
    assert t.num_experts == 4


def test_balanced_and_collapsed():
    even = np.ones(8, np.int64)
    assert coefficient_of_variation(even) == 0.0 and max_violation(even) == 0.0
    collapsed = np.array([8, 0, 0, 0])
    assert max_violation(collapsed) == 3.0  # E - 1
    assert coefficient_of_variation(collapsed) == pytest.approx(np.sqrt(3.0), rel=1e-15)
    assert coefficient_of_variation(np.zeros(4)) == 0.0 and max_violation(np.zeros(4)) == 0.0


def test_micro_batches_add_up_and_arrays_follow_steps():
    t = LoadTracker(3)
    for step, experts in [(2, [0, 1]), (0, [0, 0]), (2, [2, 2]), (1, [1, 2])]:
        t.record(pymoe.route(one_hot(experts, 3), 1, None), step=step, layer="moe.0")
    t.record(pymoe.route(one_hot([1], 3), 1, None), step=0, layer="moe.1")
    assert t.layers == ["moe.0", "moe.1"]
    assert t.steps("moe.0").tolist() == [0, 1, 2]
    np.testing.assert_array_equal(t.loads("moe.0"), [[2, 0, 0], [0, 1, 1], [1, 1, 2]])
    assert t.stats(2, "moe.0").routings == 2 and t.stats(2, "moe.0").tokens == 4
    np.testing.assert_array_equal(t.series("dead", "moe.0"), [2, 1, 0])
    np.testing.assert_allclose(t.series("max_vio", "moe.0"), [2.0, 0.5, 0.5], rtol=1e-15)
    np.testing.assert_array_equal(t.series("drop_rate", "moe.0"), 0.0)
    text = t.summary()
    assert "layer moe.0: steps 0..2 (3)" in text and "MaxVio 2.000 -> 0.500" in text
    assert "dead 2 -> 0" in text and "layer moe.1" in text and repr(t) == text
    with pytest.raises(ValueError, match="layer: required when the tracker holds 2 layers"):
        t.loads()
    t.reset()
    assert t.summary() == "LoadTracker: nothing recorded"


def test_real_tokens_with_a_token_mask():
    """A routing carrying token_mask (added to route() by another part of issue 25; emulated
    here by setting the attribute) counts its real tokens only; padding is counted apart."""
    r = pymoe.route(one_hot([0, 1, 3, 3, 3], 4), 1, None)
    object.__setattr__(r, "token_mask", np.array([True, True, True, False, False]))
    s = LoadTracker().record(r, step=0)
    assert s.load.tolist() == [1, 1, 0, 1] and s.tokens == 3 and s.padding == 2 and s.pairs == 3
    assert s.dead == 1


def test_k2_counts_pairs():
    r = pymoe.route(np.array([[3.0, 2.0, 0.0], [3.0, 0.0, 2.0]]), 2, None)
    s = LoadTracker().record(r, step=5)
    assert s.load.tolist() == [2, 1, 1] and s.pairs == 4


def test_bad_arguments():
    r = pymoe.route(one_hot([0, 1], 2), 1, None)
    t = LoadTracker(2)
    with pytest.raises(TypeError, match="routing"):
        t.record(np.zeros((2, 2)), step=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step"):
        t.record(r, step=-1)
    with pytest.raises(TypeError, match="step"):
        t.record(r, step=1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="layer"):
        t.record(r, step=0, layer=[0])
    with pytest.raises(ValueError, match="routing: expected E=2"):
        t.record(pymoe.route(one_hot([0], 3), 1, None), step=0)
    with pytest.raises(ValueError, match="num_experts"):
        LoadTracker(0)
    t.record(r, step=0)
    with pytest.raises(ValueError, match="metric"):
        t.series("imbalance")
    with pytest.raises(ValueError, match="layer: no records for 7"):
        t.loads(7)
    with pytest.raises(ValueError, match="step: no record of step 3"):
        t.stats(3)
