"""Padding masks: route(..., token_mask=m) and MoELayer.forward(x, token_mask=m).

Padding (m False) is in no statistic and gets no gradient, whatever options.padding says;
padding="absent" routes the real rows alone (route(L, m) on them equals route(L[m]) bit for
bit), "routed" (Megatron-Core) routes every row, "counted" (HF NLLB-MoE) routes the real rows
with the capacity of all T rows.
"""
from __future__ import annotations

import numpy as np
import pytest

import pymoe
from helpers import FD_RTOL, check_group_gradients, numerical_grad, randomize, rel_error
from pymoe.losses import balance_loss
from pymoe.router import logsumexp

PADDINGS = ("absent", "routed", "counted")
FIELDS = ("probs", "expert_index", "position", "gate_before_drop", "gate", "kept")


def _mask(T: int, seed: int, share: float = 0.35) -> np.ndarray:
    m = np.random.default_rng(seed).random(T) >= share
    m[0] = True
    return m


# ------------------------------------------------------------------ a literal case
def test_padding_literal_five_tokens_two_experts():
    """t0, t1 padding (both choose expert 0); real t2 -> 0, t3 -> 0, t4 -> 1; K = 1, factor 0.5.
    absent:  C = ceil(3 * 0.5 / 2) = 1 from the 3 real tokens: t2 kept, t3 dropped.
    counted: C = ceil(5 * 0.5 / 2) = 2 from all 5 rows, padding unrouted: t2, t3 kept.
    routed:  C = 2, and the padding takes expert 0's two slots first: t2, t3 dropped."""
    logits = np.array([[3.0, 0.0], [3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    m = np.array([False, False, True, True, True])
    got = {p: pymoe.route(logits, 1, 0.5, token_mask=m, padding=p) for p in PADDINGS}
    assert [got[p].capacity for p in PADDINGS] == [1, 2, 2]
    np.testing.assert_array_equal(got["absent"].position[:, 0], [-1, -1, 0, -1, 0])
    np.testing.assert_array_equal(got["counted"].position[:, 0], [-1, -1, 0, 1, 0])
    np.testing.assert_array_equal(got["routed"].position[:, 0], [0, 1, -1, -1, 0])
    probs = pymoe.route(logits, 1, None).probs
    for r in got.values():  # statistics: the real rows only, in every mode
        np.testing.assert_array_equal(r.expert_load, [2, 1])
        assert r.aux_loss == pytest.approx(2 * (2 / 3 * probs[2:, 0].mean()
                                                + 1 / 3 * probs[2:, 1].mean()), rel=1e-12)
        assert r.z_loss == pytest.approx(np.mean(logsumexp(logits[2:]) ** 2), rel=1e-12)
        assert r.num_real_tokens == 3
    assert got["absent"].dropped_fraction == 1 / 3 and got["counted"].dropped_fraction == 0
    assert got["routed"].dropped_fraction == 2 / 3  # padding's kept pairs are not counted
    assert got["routed"].tokens_dropped_fraction == 2 / 3
    np.testing.assert_array_equal(got["routed"].expert_load_kept, [0, 1])
    assert (got["absent"].gate[:2] == 0).all() and (got["routed"].gate[:2] > 0).all()
    np.testing.assert_array_equal(got["absent"].token_order, [2, 3, 4, 0, 1])
    np.testing.assert_array_equal(got["absent"].slot_owner, [[2], [4]])


def test_sequence_loss_takes_each_sequence_real_rows():
    """Per-sequence loss with padding: each sequence's f_e, P_e over its real rows, averaged over
    the sequences that have any (a sequence of padding only is left out)."""
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(12, 4))
    m = np.array([1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0], bool)  # sequences of 4; the last is empty
    for p in PADDINGS:
        r = pymoe.route(logits, 2, None, token_mask=m, padding=p, load_balancing="sequence",
                        sequence_length=4)
        a = pymoe.route(logits[0:2], 2, None).aux_loss
        b = pymoe.route(logits[4:7], 2, None).aux_loss
        assert r.aux_loss == pytest.approx((a + b) / 2, rel=1e-12)


# --------------------------------------------------------- absent == route(L[m]), bit for bit
SWEEP = [dict(), dict(normalize=True), dict(score="sigmoid", normalize=True),
         dict(priority="score"), dict(priority="token", drop_policy="probs"),
         dict(renormalize_after_drop=True), dict(capacity_factor=None),
         dict(num_groups=4, topk_groups=2, score="sigmoid", normalize=True),
         dict(selection="sinkhorn"), dict(load_balancing="first_choice"),
         dict(load_balancing="k_scaled", capacity_rule="tutel"), dict(priority="random"),
         dict(second_expert_policy="random"), dict(expert_bias=True),
         dict(selection="experts", k=8)]


@pytest.mark.parametrize("backend", ["numpy", "c"])
@pytest.mark.parametrize("kw", SWEEP, ids=lambda kw: ",".join(kw) or "default")
def test_absent_equals_routing_the_real_rows(kw, backend):
    kw = dict(kw)
    k, cf = kw.pop("k", 2), kw.pop("capacity_factor", 1.0)
    if kw.pop("expert_bias", False):
        kw["expert_bias"] = np.random.default_rng(3).normal(0, 0.5, 8)
    rng = np.random.default_rng(1)
    L = rng.normal(0, 2, size=(40, 8)).astype(np.float32)
    m = _mask(40, 4)
    seed = 7 if kw.get("priority") == "random" or kw.get("second_expert_policy") else None
    a = pymoe.route(L, k, cf, token_mask=m, backend=backend, seed=seed, **kw)
    b = pymoe.route(L[m], k, cf, backend=backend, seed=seed, **kw)
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(a, f)[m], getattr(b, f), err_msg=f)
    assert (a.position[~m] == -1).all() and (a.gate[~m] == 0).all() and not a.kept[~m].any()
    assert (a.aux_loss, a.z_loss, a.capacity) == (b.aux_loss, b.z_loss, b.capacity)
    np.testing.assert_array_equal(a.expert_load, b.expert_load)
    np.testing.assert_array_equal(a.expert_load_kept, b.expert_load_kept)
    assert a.dropped_fraction == b.dropped_fraction
    assert a.tokens_dropped_fraction == b.tokens_dropped_fraction
    real = np.flatnonzero(m)
    owner_b = np.where(b.slot_owner >= 0, real[b.slot_owner // b.k] * b.k + b.slot_owner % b.k, -1)
    np.testing.assert_array_equal(a.slot_owner, owner_b)
    dg = rng.normal(size=a.gate.shape).astype(np.float32)
    da = pymoe.route_backward(a, dg, 0.1, 0.01)
    np.testing.assert_array_equal(da[m], pymoe.route_backward(b, dg[m], 0.1, 0.01))
    assert not da[~m].any()
    if kw.get("selection") != "experts":  # the dense tensors agree on the real rows
        np.testing.assert_array_equal(a.combine_weights[m], b.combine_weights)


@pytest.mark.parametrize("padding", PADDINGS)
def test_padding_values_change_no_statistic(padding):
    """Any logits in the padding rows: the same aux, z-loss and loads (for "routed" the slots
    of real tokens may move, so its check uses dropless routing)."""
    rng = np.random.default_rng(5)
    L = rng.normal(size=(30, 6))
    m = _mask(30, 6)
    L2 = L.copy()
    L2[~m] = rng.normal(0, 5, size=((~m).sum(), 6))
    cf = None if padding == "routed" else 1.0
    a = pymoe.route(L, 2, cf, token_mask=m, padding=padding, normalize=True)
    b = pymoe.route(L2, 2, cf, token_mask=m, padding=padding, normalize=True)
    assert (a.aux_loss, a.z_loss) == (b.aux_loss, b.z_loss)
    np.testing.assert_array_equal(a.expert_load, b.expert_load)
    np.testing.assert_array_equal(a.expert_load_kept, b.expert_load_kept)
    assert a.aux_loss == pytest.approx(balance_loss(a.probs[m], a.expert_index[m]), rel=1e-12)
    assert a.z_loss == pytest.approx(np.mean(logsumexp(L[m]) ** 2), rel=1e-12)
    np.testing.assert_array_equal(a.expert_load, np.bincount(a.expert_index[m].ravel(),
                                                             minlength=6))
    bias = pymoe.update_expert_bias(np.zeros(6), a.expert_load, 0.01)  # the aux-free update
    np.testing.assert_array_equal(bias, pymoe.update_expert_bias(np.zeros(6), b.expert_load, 0.01))


def test_all_true_mask_changes_nothing():
    L = np.random.default_rng(8).normal(size=(20, 4)).astype(np.float32)
    for p in PADDINGS:
        a = pymoe.route(L, 2, 1.0, token_mask=np.ones(20, bool), padding=p)
        b = pymoe.route(L, 2, 1.0)
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
        assert (a.aux_loss, a.z_loss) == (b.aux_loss, b.z_loss)


@pytest.mark.parametrize("padding", ["routed", "counted"])
def test_numpy_and_c_agree_with_a_mask(padding):
    """The same integers; floats to float32 round-off (the C softmax's exp is libm's, not
    NumPy's: docs/backends.md), 2 ulp-scale here."""
    L = np.random.default_rng(9).normal(0, 2, size=(64, 8)).astype(np.float32)
    m = _mask(64, 10)
    for kw in (dict(), dict(normalize=True), dict(drop_policy="probs", priority="score")):
        a = pymoe.route(L, 2, 1.0, token_mask=m, padding=padding, backend="numpy", **kw)
        b = pymoe.route(L, 2, 1.0, token_mask=m, padding=padding, backend="c", **kw)
        for f in ("expert_index", "position", "kept", "token_order", "expert_load"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
        np.testing.assert_allclose(a.gate, b.gate, rtol=1e-6, atol=1e-7)
        assert a.aux_loss == pytest.approx(b.aux_loss, rel=1e-6)
        assert a.z_loss == pytest.approx(b.z_loss, rel=1e-6)


# ------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("kw", [dict(), dict(normalize=True, score="sigmoid"),
                                dict(load_balancing="sequence", sequence_length=6),
                                dict(load_balancing="k_scaled", renormalize_after_drop=True)],
                         ids=["default", "sigmoid", "sequence", "k_scaled"])
def test_route_backward_with_a_mask_matches_finite_differences(padding, kw):
    """d/dL of sum over real rows of gate * dgate + 0.3 aux + 0.2 z (float64, FD_RTOL)."""
    rng = np.random.default_rng(11)
    L = rng.normal(size=(24, 5))
    m = _mask(24, 12)
    dg = rng.normal(size=(24, 2))
    r = pymoe.route(L, 2, 1.0, token_mask=m, padding=padding, **kw)

    def f() -> float:
        s = pymoe.route(L, 2, 1.0, token_mask=m, padding=padding, **kw)
        np.testing.assert_array_equal(s.position, r.position)  # no decision moved
        return float((s.gate * dg)[m].sum() + 0.3 * s.aux_loss + 0.2 * s.z_loss)

    d = pymoe.route_backward(r, dg, 0.3, 0.2)
    assert rel_error(d, numerical_grad(f, L)) <= FD_RTOL
    assert not d[~m].any()


# ------------------------------------------------------------------------ bad masks
@pytest.mark.parametrize("mask, kind, words", [
    (np.ones(10, np.int64), TypeError, "token_mask: expected a bool array"),
    (np.ones(9, bool), ValueError, "token_mask: expected shape (10,)"),
    (np.ones((10, 1), bool), ValueError, "token_mask: expected shape (10,)"),
    (np.zeros(10, bool), ValueError, "token_mask: every one of the 10 tokens is padding"),
])
def test_bad_masks_are_named(mask, kind, words):
    L = np.zeros((10, 4))
    with pytest.raises(kind, match=words.replace("(", r"\(").replace(")", r"\)")):
        pymoe.route(L, 1, 1.0, token_mask=mask)
    layer = pymoe.MoELayer(3, 4, 4, 1, seed=0)
    with pytest.raises(kind, match="token_mask"):
        layer.forward(np.zeros((10, 3)), mask)


def test_bad_padding_keyword():
    with pytest.raises(ValueError, match="padding"):
        pymoe.route(np.zeros((4, 4)), 1, padding="ignored")
    with pytest.raises(ValueError, match="padding"):
        pymoe.route(np.zeros((4, 4)), 4, 1.0, selection="experts", padding="routed")


def test_layer_mask_has_the_tokens_shape():
    layer = pymoe.MoELayer(3, 4, 4, 2, seed=0)
    x = np.random.default_rng(0).normal(size=(2, 5, 3))
    m = np.ones((2, 5), bool)
    m[1, 3:] = False
    y = layer.forward(x, m)
    assert y.shape == x.shape and (y[1, 3:] == 0).all()
    with pytest.raises(ValueError, match=r"token_mask: expected shape \(2, 5\)"):
        layer.forward(x, m.reshape(-1))


# ------------------------------------------------------------------------ MoELayer
def _layer(padding: str, **kw) -> pymoe.MoELayer:
    layer = pymoe.MoELayer(5, 6, 4, 2, 1.0, seed=3, dtype=np.float64, padding=padding,
                           aux_loss_coef=0.1, z_loss_coef=0.05, **kw)
    randomize(layer, 4)
    return layer


@pytest.mark.parametrize("formulation", ["indexed", "dense"])
def test_layer_absent_is_the_layer_on_the_real_rows(formulation):
    """y, dx and every gradient equal the layer on x[m] (to float64 round-off: the matmuls
    over T and T_real rows may block differently, so 1e-12, not bits); y = dx = 0 on padding."""
    rng = np.random.default_rng(13)
    x, dy = rng.normal(size=(16, 5)), rng.normal(size=(16, 5))
    m = _mask(16, 14)
    a, b = (_layer("absent", formulation=formulation, num_shared_experts=1) for _ in range(2))
    ya, yb = a.forward(x, m), b.forward(x[m])
    np.testing.assert_allclose(ya[m], yb, rtol=1e-12, atol=1e-12)
    assert not ya[~m].any()
    dxa, dxb = a.backward(dy), b.backward(dy[m])
    np.testing.assert_allclose(dxa[m], dxb, rtol=1e-12, atol=1e-12)
    assert not dxa[~m].any()
    for n in a.grads:
        np.testing.assert_allclose(a.grads[n], b.grads[n], rtol=1e-10, atol=1e-12, err_msg=n)
    assert a.aux_loss == pytest.approx(b.aux_loss, rel=1e-12)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("formulation", ["indexed", "dense"])
def test_layer_gradients_with_a_mask(padding, formulation):
    """Every gradient of sum(y * dy) over the real rows + loss_terms() against central
    differences in float64; with "routed" y is nonzero on padding but outside the objective."""
    rng = np.random.default_rng(15)
    x, dy = rng.normal(size=(14, 5)), rng.normal(size=(14, 5))
    m = _mask(14, 16)
    layer = _layer(padding, formulation=formulation, num_shared_experts=1)

    def f() -> float:
        return float((layer.forward(x, m) * dy)[m].sum() + layer.loss_terms())

    y = layer.forward(x, m)
    assert (np.abs(y[~m]).max() > 0) == (padding == "routed")
    dx = layer.backward(dy)
    grads = {n: g.copy() for n, g in layer.grads.items()}
    assert rel_error(dx, numerical_grad(f, x)) <= FD_RTOL
    for n, p in layer.params.items():
        assert rel_error(grads[n], numerical_grad(f, p)) <= FD_RTOL, n


def test_layer_noisy_topk_load_loss_leaves_padding_out():
    rng = np.random.default_rng(17)
    x = rng.normal(size=(12, 5))
    m = _mask(12, 18)
    layer = _layer("absent", router_noise="noisy_topk", load_loss_coef=1.0)
    layer.forward(x, m)
    masked = layer.load_loss
    other = x.copy()
    other[~m] *= 7
    layer.forward(other, m)
    assert layer.load_loss == masked

    def f() -> float:
        return float(layer.forward(x, m).sum() * 0 + layer.loss_terms())

    f()
    layer.backward(np.zeros_like(x))
    g = layer.grads["w_noise"].copy()
    assert rel_error(g, numerical_grad(f, layer.params["w_noise"])) <= FD_RTOL


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("load_stats", ["local", "global"])
def test_token_groups_with_a_mask(padding, load_stats):
    """The mask is split like x; each group's statistics over its real rows ("global": over
    every group's), a group of padding only included; gradients against central differences."""
    rng = np.random.default_rng(19)
    x, dy = rng.normal(size=(12, 5)), rng.normal(size=(12, 5))
    m = _mask(12, 20)
    m[4:8] = False  # group 1 of 3 is all padding
    layer = _layer(padding, token_groups=3, load_stats=load_stats, num_shared_experts=1)
    routings = check_group_gradients(layer, x, dy, m)
    assert [r.num_real_tokens for r in routings] == [m[0:4].sum(), 0, m[8:].sum()]
    y = layer.forward(x, m)
    assert (np.abs(y[~m]).max() > 0) == (padding == "routed")
    if load_stats == "local" and padding == "absent":  # groups = routing each group's real rows
        for g, r in enumerate(routings):
            rows = slice(4 * g, 4 * g + 4)
            if m[rows].any():
                ref = pymoe.route(r.router_logits[m[rows]], 2, 1.0)
                assert r.aux_loss == ref.aux_loss and r.capacity == ref.capacity
