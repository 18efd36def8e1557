"""Presets: names, printing, overrides, and route() / MoELayer taking them (no other system needed;
the cross-checks against each system's own code are tests/test_crosscheck_*.py)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import pymoe
from helpers import FD_RTOL, check_layer_gradients, randomize

NAMES = ["switch", "gshard", "flaxformer", "deepspeed-top1", "deepspeed-top2", "deepspeed-topk",
         "tutel", "megablocks", "megatron", "mixtral", "qwen2-moe", "qwen3-moe", "deepseek-v3",
         "gpt-oss", "olmoe", "nllb-moe", "qwen3-next", "glm4-moe", "llama4", "deepseek-v2",
         "ernie4.5", "gemma4", "inkling", "deepseek-v4", "phimoe", "doge"]



def test_names():
    assert pymoe.presets() == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_preset_is_frozen_and_printable(name):
    p = pymoe.preset(name)
    assert isinstance(p, pymoe.Preset) and p.name == name and p.source
    text = str(p)
    for f in dataclasses.fields(p):
        assert f.name in text
    assert repr(p).startswith("Preset(")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.priority = "choice"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("cf", [1.25, None])
def test_route_as_written(name, cf):
    """route(logits, k=K, capacity_factor=cf, min_capacity=m, preset=name) and the same dropless
    work for every preset, the preset supplying every other convention."""
    logits = np.random.default_rng(0).normal(size=(64, 16))
    k = 1 if name in ("switch", "deepspeed-top1") else 2
    r = pymoe.route(logits, k=k, capacity_factor=cf, min_capacity=2, preset=name)
    p = pymoe.preset(name)
    assert r.options.priority == p.priority and r.options.score == p.score
    assert r.options.load_balancing == p.load_balancing and r.options.min_capacity == 2
    assert r.options.capacity_factor == cf
    if cf is None:
        assert r.kept.all()
    assert r.combine_weights.shape == (64, 16, r.capacity)
    same = pymoe.route(logits, k, cf, min_capacity=2, preset=p)  # the object works like the name
    np.testing.assert_array_equal(same.position, r.position)


def test_published_defaults():
    p = pymoe.preset("deepseek-v3")
    assert (p.score, p.num_groups, p.topk_groups, p.normalize, p.scaling_factor) == \
        ("sigmoid", 8, 4, True, 2.5)
    r = pymoe.route(np.random.default_rng(1).normal(size=(32, 64)), 8, None, preset="deepseek-v3")
    assert np.allclose(r.gate.sum(axis=1), 2.5)  # renormalised, then scaled
    groups = r.expert_index // 8  # 8 groups of 8 experts
    assert all(len(set(g)) <= 4 for g in groups)


def test_explicit_keywords_win():
    logits = np.random.default_rng(2).normal(size=(40, 8))
    r = pymoe.route(logits, 2, 1.0, preset="megatron", drop_policy="position", priority="choice")
    assert (r.options.drop_policy, r.options.priority, r.options.normalize) == \
        ("position", "choice", True)
    plain = pymoe.route(logits, 2, 1.0, normalize=True)
    np.testing.assert_array_equal(r.position, plain.position)
    # overriding a field in preset() is the same as passing the keyword
    q = pymoe.preset("megatron", drop_policy="position", priority="choice")
    np.testing.assert_array_equal(pymoe.route(logits, 2, 1.0, preset=q).position, r.position)


def test_normalize_when_k_above_one():
    """Tutel and Megatron renormalise only for K > 1 (a single renormalised gate is 1)."""
    logits = np.random.default_rng(3).normal(size=(20, 8))
    for name in ("tutel", "megatron"):
        assert pymoe.route(logits, 1, None, preset=name).options.normalize is False
        assert pymoe.route(logits, 2, None, preset=name).options.normalize is True


def test_random_presets_are_reproducible():
    logits = np.random.default_rng(4).normal(size=(64, 8)) - 0.5 * np.arange(8)
    a = pymoe.route(logits, 2, 1.25, preset="gshard")
    b = pymoe.route(logits, 2, 1.25, preset="gshard")
    np.testing.assert_array_equal(a.position, b.position)
    c = pymoe.route(logits, 2, 1.25, preset="gshard", seed=7)
    assert not np.array_equal(a.kept, c.kept)
    assert pymoe.route(logits, 1, 1.25, preset="gshard").options.second_expert_policy == "all"


def test_aux_loss_scales():
    """The same routing, three aux-loss conventions: first choice only, all K / (T K), all K / T."""
    logits = np.random.default_rng(5).normal(size=(50, 8))
    switch = pymoe.route(logits, 2, None, normalize=True).aux_loss
    assert pymoe.route(logits, 2, None, preset="mixtral").aux_loss == pytest.approx(2 * switch)
    assert pymoe.route(logits, 2, None, preset="megatron").aux_loss == pytest.approx(switch)
    first = pymoe.route(logits, 1, None).aux_loss
    assert pymoe.route(logits, 2, None, preset="tutel").aux_loss == pytest.approx(first)


def test_bad_preset():
    logits = np.zeros((4, 8))
    with pytest.raises(ValueError, match="preset: unknown name 'mixtral-8x7b'"):
        pymoe.route(logits, 2, preset="mixtral-8x7b")
    with pytest.raises(TypeError, match="preset: expected a name"):
        pymoe.route(logits, 2, preset=3)
    with pytest.raises(TypeError, match="preset: unknown field"):
        pymoe.preset("switch", capacity_factr=1.0)
    with pytest.raises(ValueError, match="num_groups"):  # 8 groups need E divisible by 8
        pymoe.route(np.zeros((4, 12)), 2, preset="deepseek-v3")


@pytest.mark.parametrize("name", ["qwen2-moe", "deepseek-v3", "deepspeed-topk", "nllb-moe"])
def test_layer_with_preset(name):
    """MoELayer takes the preset (shared experts too); its float64 gradients agree with central
    finite differences."""
    E = 8 if name != "deepseek-v3" else 16
    cf = None if name in ("qwen2-moe", "deepseek-v3") else 1.0
    layer = pymoe.MoELayer(5, 6, E, 2, cf, preset=name, dtype=np.float64, aux_loss_coef=0.1,
                           seed=1, backend="numpy")
    p = pymoe.preset(name)
    assert layer.options.load_balancing == p.load_balancing
    assert layer.options.capacity_factor == cf
    randomize(layer, seed=2)
    rng = np.random.default_rng(3)
    x, dy = rng.normal(size=(24, 5)), rng.normal(size=(24, 5))
    errors = check_layer_gradients(layer, x, dy)
    assert max(errors.values()) < FD_RTOL, errors


def test_readme_presets_snippet_runs(capsys):
    import os
    import re

    from helpers import REPO

    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = readme.split("## Presets", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    env = {"pymoe": pymoe, "logits": np.random.default_rng(0).normal(size=(64, 16))}
    exec(compile(code, "README.md", "exec"), env)  # noqa: S102 - the README's own example
    assert isinstance(env["r"], pymoe.Routing) and env["r"].capacity > 0
    assert "deepseek-v3" in capsys.readouterr().out
