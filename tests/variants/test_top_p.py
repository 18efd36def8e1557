"""Top-p (dynamic-K) routing (arXiv 2403.07652, github:ZhenweiAn/Dynamic_MoE): the original's
keep rule on literal cases, the ragged selection through capacity, slots, loads and the aux loss,
the gradients against central differences in float64, and the refusals by name."""
import numpy as np
import pytest

import pymoe
from helpers import (
    FD_RTOL,
    assert_png_matches,
    check_layer_gradients,
    layout_problems,
    numerical_grad,
    padding_takes_nothing_on_both_backends,
    randomize,
    rel_error,
)
from pymoe import viz
from pymoe.losses import GlobalLoadBalance, load_balancing_loss
from pymoe.variants.top_p import (
    dynamic_loss,
    dynamic_loss_backward,
    ragged_balance_loss,
    top_p_keep,
)

# Probabilities that are exact in binary, so the running sums below are exact too.
P = np.array([[0.5, 0.25, 0.25],
              [0.125, 0.75, 0.125],
              [0.25, 0.25, 0.5]])
ORDER = np.array([[0, 1, 2], [1, 0, 2], [2, 0, 1]])  # each row's experts, best first (ties low)


def test_keep_rule_literal():
    """The original: cumsum of the sorted probabilities, mask = cumsum > p, the first masked
    position kept. p = 0.5: row 0's running sums 0.5, 0.75 -> 0.5 is not > 0.5, so the second
    expert (the crossing one) is taken too; row 1's 0.75 > 0.5 at once -> one expert."""
    np.testing.assert_array_equal(top_p_keep(P, ORDER, 0.5),
                                  [[True, True, False], [True, False, False],
                                   [True, True, False]])
    # p = 0.75: rows 0 and 2 cross only at the third (sums 0.5, 0.75, 1.0); row 1 at the
    # second (0.75, 0.875)
    np.testing.assert_array_equal(top_p_keep(P, ORDER, 0.75),
                                  [[True, True, True], [True, True, False],
                                   [True, True, True]])
    assert top_p_keep(P, ORDER, 1.0).all()  # nothing passes 1: every expert
    assert top_p_keep(P, ORDER, 1e-9)[:, 1:].sum() == 0  # tiny p: the first expert only


def test_route_literal():
    """Three tokens, three experts, p = 0.6: K per token 2, 1, 2; gates the probabilities
    themselves; loads count the taken pairs only; aux = E sum f_e P_e with f over the 5 taken
    pairs: f = (3/5, 2/5, 0), P = (0.6, 0.25, 0.15) -> 3 * (0.36 + 0.1) = 1.38."""
    logits = np.log(np.array([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05], [0.4, 0.4, 0.2]]))
    for backend in ("numpy", "c"):
        r = pymoe.route(logits, k=3, capacity_factor=None, top_p=0.6, backend=backend)
        np.testing.assert_array_equal(r.experts_per_token, [2, 1, 2])
        np.testing.assert_array_equal(r.expert_load, [3, 2, 0])
        # the softmax of these logs gives back the probabilities to round-off (1e-15 relative)
        np.testing.assert_allclose(r.gate, [[0.5, 0.3, 0], [0.9, 0, 0], [0.4, 0.4, 0]],
                                   rtol=1e-12, atol=0)
        np.testing.assert_array_equal(r.position >= 0, r.selected)  # dropless: all taken kept
        assert r.aux_loss == pytest.approx(1.38, rel=1e-12)
        assert r.dropped_fraction == 0.0  # of the 5 taken pairs, not of T*K = 9
        assert "kept 5 of 5" in repr(r)


def test_cap_and_capacity():
    """k caps K; with a capacity the unselected pairs take no slot, so the C slots of an expert
    go to the taken pairs in priority order (choice-major: first choices first)."""
    logits = np.log(np.array([[0.4, 0.35, 0.25], [0.4, 0.3, 0.3], [0.3, 0.4, 0.3]]))
    r = pymoe.route(logits, k=2, capacity_factor=None, top_p=0.9)
    np.testing.assert_array_equal(r.experts_per_token, [2, 2, 2])  # capped at k = 2
    r = pymoe.route(logits, k=3, capacity=1, top_p=0.5)  # K = 2, 2, 2; one slot per expert
    np.testing.assert_array_equal(r.expert_index[:, :2], [[0, 1], [0, 1], [1, 0]])
    np.testing.assert_array_equal(r.selected[:, 2], [False] * 3)
    # first choices in token order: token 0 -> e0 slot 0, token 1 -> e0 full, token 2 -> e1 slot 0
    np.testing.assert_array_equal(r.position, [[0, -1, -1], [-1, -1, -1], [0, -1, -1]])
    np.testing.assert_array_equal(r.expert_load, [3, 3, 0])  # competing (taken) pairs
    assert r.dropped_fraction == pytest.approx(4 / 6)


def test_matches_topk_when_every_token_takes_k():
    """p = 1 with k < E: each token takes exactly k experts, the same routing as plain top-K."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 6))
    a = pymoe.route(logits, 2, 1.0, top_p=1.0)
    b = pymoe.route(logits, 2, 1.0)
    for name in ("expert_index", "position", "gate", "expert_load"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.aux_loss == pytest.approx(b.aux_loss, rel=1e-14)  # f: the same counts, N = T*K


@pytest.mark.parametrize("backend", ["numpy", "c"])
def test_backends_agree(backend):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(40, 8)) * 2
    ref = pymoe.route(logits, 8, 1.0, top_p=0.7, priority="score", drop_policy="probs")
    got = pymoe.route(logits, 8, 1.0, top_p=0.7, priority="score", drop_policy="probs",
                      backend=backend)
    for name in ("expert_index", "selected", "position", "expert_load"):
        np.testing.assert_array_equal(getattr(got, name), getattr(ref, name))
    assert len(set(ref.experts_per_token.tolist())) > 1  # K really varies here


@pytest.mark.parametrize("kw", [dict(), dict(renormalize_after_drop=True),
                                dict(load_balancing="first_choice")])
def test_route_backward(kw):
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(10, 5)) * 2
    dgate = rng.normal(size=(10, 4))

    def objective():
        r = pymoe.route(logits, 4, 0.25, top_p=0.6, **kw)
        return float(np.sum(r.gate * dgate)) + 0.7 * r.aux_loss + 0.2 * r.z_loss

    r = pymoe.route(logits, 4, 0.25, top_p=0.6, **kw)
    assert r.dropped_fraction > 0 and len(set(r.experts_per_token.tolist())) > 1
    got = pymoe.route_backward(r, dgate, aux_loss_coef=0.7, z_loss_coef=0.2)
    assert rel_error(got, numerical_grad(objective, logits)) <= FD_RTOL


def test_dynamic_loss_literal_and_gradient():
    """Uniform over 4 experts: entropy log 4; one-hot: 0 (0 log 0 = 0)."""
    probs = np.array([[0.25] * 4, [1.0, 0, 0, 0]])
    assert dynamic_loss(probs) == pytest.approx(np.log(4) / 2, rel=1e-15)
    logits = np.random.default_rng(3).normal(size=(6, 4))

    def objective():
        return 0.3 * dynamic_loss(pymoe.route(logits, 1, None).probs)

    got = dynamic_loss_backward(pymoe.route(logits, 1, None).probs, 0.3)
    assert rel_error(got, numerical_grad(objective, logits)) <= FD_RTOL


@pytest.mark.parametrize("formulation", ["indexed", "dense"])
@pytest.mark.parametrize("kw", [dict(k=4, capacity_factor=0.3),
                                dict(k=3, capacity_factor=None, dynamic_loss_coef=0.05)])
def test_layer_gradients(formulation, kw):
    layer = pymoe.MoELayer(4, 5, 4, top_p=0.55, aux_loss_coef=0.3, z_loss_coef=0.05,
                           formulation=formulation, backend="numpy", dtype=np.float64, **kw)
    randomize(layer, seed=11)
    rng = np.random.default_rng(5)
    x, dy = rng.normal(size=(12, 4)), rng.normal(size=(12, 4))
    errors = check_layer_gradients(layer, x, dy)
    assert max(errors.values()) <= FD_RTOL, errors
    assert len(set(layer.routing.experts_per_token.tolist())) > 1
    assert (layer.routing.dropped_fraction > 0) == (kw["capacity_factor"] is not None)
    if kw.get("dynamic_loss_coef"):
        assert layer.dynamic_loss > 0


def test_layer_padding_and_c_backend():
    """Padding rows take nothing; the C backend's layer gives the NumPy one's output."""
    padding_takes_nothing_on_both_backends(4, top_p=0.6)


@pytest.mark.parametrize("kw, name", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p="0.5"), "top_p"),
    (dict(top_p=0.5, score="sigmoid"), "score"), (dict(top_p=0.5, normalize=True), "normalize"),
    (dict(top_p=0.5, selection="experts"), "selection"),
    (dict(top_p=0.5, load_balancing="k_scaled"), "load_balancing"),
    (dict(top_p=0.5, num_groups=2, topk_groups=1), "num_groups"),
])
def test_refusals(kw, name):
    with pytest.raises((ValueError, TypeError), match=name):
        pymoe.route(np.zeros((3, 4)), 2, 1.0, **kw)


def test_refusals_layer_and_replay():
    with pytest.raises(ValueError, match="token_groups"):
        pymoe.MoELayer(4, 5, 4, 2, top_p=0.5, token_groups=2)
    with pytest.raises(ValueError, match="dynamic_loss_coef"):
        pymoe.MoELayer(4, 5, 4, 2, dynamic_loss_coef=0.1)
    with pytest.raises(ValueError, match="replay"):
        pymoe.route(np.zeros((3, 4)), 2, 1.0, top_p=0.5, replay=np.zeros((3, 2), int) + [0, 1])
    with pytest.raises(ValueError, match="ragged"):
        GlobalLoadBalance(4, 2).update(pymoe.route(np.zeros((3, 4)), 2, 1.0, top_p=0.5))


def test_ragged_loss_equals_switch_loss_when_full():
    rng = np.random.default_rng(4)
    probs = pymoe.route(rng.normal(size=(8, 4)), 2, None).probs
    index = np.argsort(-probs, axis=-1)[:, :2]
    assert ragged_balance_loss(probs, index, np.ones((8, 2), bool)) == pytest.approx(
        load_balancing_loss(probs, index), rel=1e-14)


def test_picture(tmp_path, monkeypatch):
    """A PNG of the figure's size with nothing clipped, and the text version's rows by hand."""
    logits = np.log(np.array([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05], [0.4, 0.4, 0.2]]))
    r = pymoe.route(logits, 3, None, top_p=0.6)
    if viz.have_matplotlib():
        path = tmp_path / "k.png"
        fig = viz.experts_per_token_picture(r, str(path))
        assert_png_matches(path, fig)
        assert layout_problems(fig) == []
    monkeypatch.setenv("PYMOE_VIZ_TEXT", "1")
    text = viz.experts_per_token_picture(r, str(tmp_path / "k.png"))
    assert text.splitlines()[1:] == ["  t0   ## 2", "  t1   # 1", "  t2   ## 2"]
    with pytest.raises(TypeError, match="routing"):
        viz.experts_per_token_picture(logits, str(tmp_path / "k.png"))


def test_cuda_device_route_refuses_by_name():
    """CudaBackend.route runs the keywords marked device=True only and refuses the others with a
    TypeError naming them: top_p and selection (so ReMoE's "relu") are not among them."""
    from pymoe.options import device_keywords

    assert "top_p" not in device_keywords() and "selection" not in device_keywords()

