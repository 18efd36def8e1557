"""What a new user reads: errors that name what they passed, warnings that point at their own line,
a Routing that prints as a summary."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import pymoe


def test_wrong_rank_logits_name_the_legend():
    with pytest.raises(ValueError, match=r"router_logits: expected a 2-D array \[T, E\], got shape "
                                         r"\(2, 3, 4\)"):
        pymoe.route(np.zeros((2, 3, 4)), 1)


@pytest.mark.parametrize("call", [
    lambda: pymoe.route(np.zeros((2, 3)), 1, normalize=True),
    lambda: pymoe.route(np.zeros((2, 3)), 1, normalize=True, preset="mixtral"),
    lambda: pymoe.MoELayer(2, 3, 3, 1, normalize=True),
    lambda: pymoe.MoELayer(2, 3, 3, 1, preset="mixtral"),
])
def test_warnings_point_at_the_callers_line(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    assert caught and all(w.filename == __file__ for w in caught), [
        (w.filename, w.lineno) for w in caught]


@pytest.mark.parametrize("name, k", [("switch", 2), ("deepspeed-top1", 2), ("gshard", 1),
                                     ("deepspeed-top2", 3), ("nllb-moe", 1)])
def test_a_preset_at_another_k_than_its_gating_function_warns(name, k):
    with pytest.warns(UserWarning, match=rf"preset '{name}' is a top-{pymoe.preset(name).k} "
                                         rf"gating function.*k={k}"):
        pymoe.route(np.zeros((8, 4)), k, preset=name)


@pytest.mark.parametrize("k, error", [(0, ValueError), (-1, ValueError), ("2", TypeError),
                                      (True, TypeError)])
def test_a_preset_k_must_be_a_positive_int_or_none(k, error):
    with pytest.raises(error, match="^k: "):
        pymoe.preset("switch", k=k)
    assert pymoe.preset("switch", k=None).k is None and pymoe.preset("gshard", k=4).k == 4


def test_a_preset_at_its_own_or_any_k_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pymoe.route(np.zeros((8, 4)), 1, preset="switch")
        pymoe.route(np.zeros((8, 4)), 2, preset="gshard")
        pymoe.route(np.zeros((8, 4)), 3, preset="megatron")  # K is a configuration value there


def test_compare_warns_once_and_notes_the_mismatch_under_its_table():
    logits = np.random.default_rng(0).normal(size=(32, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = pymoe.compare(logits, ["mixtral", "switch", "deepspeed-top1"], k=2)
    assert len(caught) == 1 and "switch" in str(caught[0].message)
    assert caught[0].filename == __file__
    notes = [line for line in c.table().splitlines() if line.startswith("note: ")]
    assert len(notes) == 2 and "'switch' is a top-1" in notes[0] and "k=2" in notes[0]
    assert not pymoe.compare(logits, ["mixtral", "switch"], k=1).notes


def test_preset_that_does_not_fit_e_names_the_preset_and_e():
    with pytest.raises(ValueError, match=r"preset: 'deepseek-v3' sets num_groups=8, topk_groups=4, "
                                         r"group_score_k=2, which does not fit E = 8 experts"):
        pymoe.route(np.zeros((4, 8)), 2, preset="deepseek-v3")
    with pytest.raises(ValueError, match=r"preset: 'deepseek-v3' .* E = 8 experts"):
        pymoe.MoELayer(4, 8, 8, 2, preset="deepseek-v3")
    with pytest.raises(ValueError, match=r"^num_groups: must divide"):  # the caller's own value
        pymoe.route(np.zeros((4, 8)), 2, preset="deepseek-v3", num_groups=3)


def test_routing_prints_as_a_short_summary():
    r = pymoe.route(np.random.default_rng(0).normal(size=(512, 64)), 2, 1.0)
    text = repr(r)
    assert text == str(r) and len(text.splitlines()) <= 5 and len(text) < 600, text
    assert text.startswith("Routing(T=512, E=64, K=2, capacity C=16")
    assert f"kept {int(r.kept.sum())} of 1024" in text and "expert_load [" in text
