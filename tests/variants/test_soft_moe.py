"""Soft MoE (pymoe.SoftMoELayer): literal cases, gradients against central differences in float64,
the refusals by name, and the picture. The cross-check against soft-moe-pytorch is
test_crosscheck_soft_moe.py."""
import numpy as np
import pytest

import pymoe
from helpers import FD_RTOL, assert_png_matches, layout_problems, numerical_grad, rel_error
from pymoe import viz

LN3 = np.log(3.0)


def identity_experts(layer):
    """relu experts with w1 = w2 = I (H = D) and zero biases: out = relu(slot)."""
    D = layer.d_model
    layer.params["w1"][...] = np.eye(D)
    layer.params["w2"][...] = np.eye(D)
    layer.params["b1"][...] = 0
    layer.params["b2"][...] = 0


def test_one_slot_literal():
    """One expert, one slot, raw dot products: tokens (0, 0) and (ln 3, 0), slot embedding (1, 0):
    logits 0 and ln 3, so the slot is 1/4 (0, 0) + 3/4 (ln 3, 0); the only slot gets combine
    weight 1 in every token, so y = relu(slot) = (0.75 ln 3, 0) for both tokens."""
    layer = pymoe.SoftMoELayer(2, 2, 1, 1, normalize=False, dtype=np.float64)
    identity_experts(layer)
    layer.params["slot_embeds"][...] = [[[1.0, 0.0]]]
    y = layer(np.array([[0.0, 0.0], [LN3, 0.0]]))
    # softmax's exp and sum: within a few ulps of 1/4, 3/4 (1e-15 relative)
    np.testing.assert_allclose(layer.dispatch_weights[0, :, 0], [0.25, 0.75], rtol=1e-15)
    np.testing.assert_array_equal(layer.combine_weights, 1.0)
    np.testing.assert_allclose(y, [[0.75 * LN3, 0.0]] * 2, rtol=1e-15, atol=0)


def test_two_experts_literal():
    """Two experts with one slot each, embeddings (1, 0) and (0, 1): token (ln 3, 0) has logits
    (ln 3, 0), so its combine weights over the two slots are (3/4, 1/4); token (0, ln 3) the
    reverse. Slot 0 mixes the tokens by softmax(ln 3, 0) = (3/4, 1/4): (0.75 ln 3, 0.25 ln 3);
    slot 1 by (1/4, 3/4): (0.25 ln 3, 0.75 ln 3). y of token 0 = 3/4 slot0 + 1/4 slot1 =
    (10/16 ln 3, 6/16 ln 3)."""
    layer = pymoe.SoftMoELayer(2, 2, 2, 1, normalize=False, dtype=np.float64)
    identity_experts(layer)
    layer.params["slot_embeds"][...] = [[[1.0, 0.0]], [[0.0, 1.0]]]
    y = layer(np.array([[LN3, 0.0], [0.0, LN3]]))
    np.testing.assert_allclose(layer.combine_weights[0], [[0.75, 0.25], [0.25, 0.75]],
                               rtol=1e-15)
    np.testing.assert_allclose(y, LN3 / 16 * np.array([[10.0, 6.0], [6.0, 10.0]]), rtol=1e-15)


def test_sequences_mix_on_their_own():
    """[B, N, D]: each sequence is its own Soft MoE (the slots mix its tokens only)."""
    rng = np.random.default_rng(0)
    layer = pymoe.SoftMoELayer(4, 6, 3, 2, dtype=np.float64)
    x = rng.normal(size=(2, 5, 4))
    y = layer(x)
    for b in range(2):  # the same matmuls on a smaller batch: float64 round-off only
        np.testing.assert_allclose(layer(x[b]), y[b], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(layer.dispatch_weights.sum(axis=1), 1.0, rtol=1e-14)
    np.testing.assert_allclose(layer.combine_weights.sum(axis=2), 1.0, rtol=1e-14)


@pytest.mark.parametrize("kw", [dict(), dict(normalize=False), dict(activation="swiglu"),
                                dict(activation="gelu", num_slots=1)])
def test_gradients(kw):
    kw = {"num_slots": 2, **kw}
    layer = pymoe.SoftMoELayer(4, 5, 3, dtype=np.float64, seed=1, **kw)
    rng = np.random.default_rng(0)
    for p in layer.params.values():
        p += rng.normal(size=p.shape) * 0.3  # norm weights and biases away from 1 and 0
    x, dy = rng.normal(size=(2, 5, 4)), rng.normal(size=(2, 5, 4))

    def objective():
        return float(np.sum(layer(x) * dy))

    objective()
    dx = layer.backward(dy)
    grads = {n: g.copy() for n, g in layer.grads.items()}
    assert rel_error(dx, numerical_grad(objective, x)) <= FD_RTOL
    for name, p in layer.params.items():
        assert rel_error(grads[name], numerical_grad(objective, p)) <= FD_RTOL, name


@pytest.mark.parametrize("kw, name", [
    (dict(num_slots=0), "num_slots"), (dict(normalize=1), "normalize"),
    (dict(activation="tanh"), "activation"), (dict(top_p=0.5), "top_p"),
    (dict(capacity_factor=1.0), "capacity_factor"), (dict(aux_loss_coef=0.1), "aux_loss_coef"),
    (dict(dtype=np.float16), "dtype"), (dict(swiglu_limit=7.0), "swiglu_limit"),
    (dict(bogus=1), "bogus"),
])
def test_refusals(kw, name):
    with pytest.raises((ValueError, TypeError), match=name):
        pymoe.SoftMoELayer(4, 5, 3, **kw)


def test_bad_calls():
    layer = pymoe.SoftMoELayer(4, 5, 3, 2)
    with pytest.raises(ValueError, match="backward"):
        layer.backward(np.zeros((3, 4)))
    for x in (np.zeros((3, 5)), np.zeros((0, 4)), np.zeros((1, 2, 3, 4))):
        with pytest.raises(ValueError, match="x"):
            layer(x)
    layer(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="dy"):
        layer.backward(np.zeros((4, 4)))


def test_picture(tmp_path, monkeypatch):
    layer = pymoe.SoftMoELayer(2, 2, 2, 1, normalize=False, dtype=np.float64)
    layer.params["slot_embeds"][...] = [[[1.0, 0.0]], [[0.0, 1.0]]]
    layer(np.array([[LN3, 0.0], [0.0, LN3]]))
    if viz.have_matplotlib():
        path = tmp_path / "soft.png"
        fig = viz.soft_moe_picture(layer, str(path))
        assert_png_matches(path, fig)
        assert layout_problems(fig) == []
    monkeypatch.setenv("PYMOE_VIZ_TEXT", "1")
    text = viz.soft_moe_picture(layer, str(tmp_path / "s.png"))
    assert "dispatch" in text and "0.75" in text and "0.25" in text
    with pytest.raises(ValueError, match="layer"):
        viz.soft_moe_picture(pymoe.SoftMoELayer(2, 2, 2), str(tmp_path / "s.png"))
