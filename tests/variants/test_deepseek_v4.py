"""DeepSeek-V4's router: the sqrt(softplus) score and hash routing (route(..., hash_table=,
token_ids=), MoELayer(hash_table=).forward(x, token_ids=)): literal values a reader can check by
hand, gradients against central differences in float64, and the argument checks."""
from __future__ import annotations

import math

import numpy as np
import pytest

import pymoe
from helpers import FD_RTOL, check_layer_gradients, numerical_grad, randomize, rel_error
from pymoe.variants.scores import sqrt_softplus


def _logit(s: float) -> float:
    """The logit whose sqrt(softplus) is s: softplus(l) = s^2, l = log(exp(s^2) - 1)."""
    return math.log(math.expm1(s * s))


def test_sqrt_softplus_literal():
    # softplus(0) = log 2; and the logits chosen so that the scores are 2, 1, 0.5
    assert sqrt_softplus(np.array([0.0]))[0] == pytest.approx(math.sqrt(math.log(2)), rel=1e-15)
    s = sqrt_softplus(np.array([_logit(2.0), _logit(1.0), _logit(0.5)]))
    np.testing.assert_allclose(s, [2.0, 1.0, 0.5], rtol=1e-14)  # two roundings of exp/log


def test_deepseek_v4_preset_literal():
    """Scores 2, 1, 0.5; K = 2, renormalised, x 1.5: experts {0, 1}, gates 2/3 * 1.5 = 1 and
    1/3 * 1.5 = 0.5. With b = [0, 0, 0.6] the ranked s + b is 2, 1, 1.1: experts {0, 2}, gates
    2/2.5 * 1.5 = 1.2 and 0.5/2.5 * 1.5 = 0.3 (the bias chooses, the scores gate)."""
    logits = np.array([[_logit(2.0), _logit(1.0), _logit(0.5)]])
    r = pymoe.route(logits, 2, preset="deepseek-v4")
    assert r.expert_index.tolist() == [[0, 1]]
    np.testing.assert_allclose(r.gate, [[1.0, 0.5]], rtol=1e-14)
    r = pymoe.route(logits, 2, preset="deepseek-v4", expert_bias=np.array([0.0, 0.0, 0.6]))
    assert r.expert_index.tolist() == [[0, 2]]
    np.testing.assert_allclose(r.gate, [[1.2, 0.3]], rtol=1e-14)


def test_hash_routing_literal():
    """Table: id 0 -> experts (1, 2), id 1 -> (0, 2). Tokens with ids 1, 0 and scores 2, 1, 0.5:
    token 0 goes to 0 and 2 whatever it scores best, gates 2/2.5 * 1.5 = 1.2 and 0.3; token 1 to
    1 and 2, gates 1/1.5 * 1.5 = 1 and 0.5."""
    row = [_logit(2.0), _logit(1.0), _logit(0.5)]
    r = pymoe.route(np.array([row, row]), 2, preset="deepseek-v4",
                    hash_table=np.array([[1, 2], [0, 2]]), token_ids=np.array([1, 0]))
    assert r.expert_index.tolist() == [[0, 2], [1, 2]]
    np.testing.assert_allclose(r.gate, [[1.2, 0.3], [1.0, 0.5]], rtol=1e-14)
    assert r.expert_load.tolist() == [1, 1, 2]  # the hashed experts are the ones counted


def test_sqrt_softplus_underflow_is_stable():
    """Below l ~ -1490 (float64) s = sqrt(exp(l)) underflows to 0; the renormalised gates are
    then exp(l_i / 2) / sum_j exp(l_j / 2) from the logarithms, and the gradient is finite."""
    logits = np.array([[-2000.0, -2001.0, -2010.0]])
    r = pymoe.route(logits, 2, None, score="sqrtsoftplus", normalize=True)
    assert (r.probs == 0).all()
    np.testing.assert_allclose(r.gate, [[1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(0.5))]],
                               rtol=1e-12)
    d = pymoe.route_backward(r, np.array([[1.0, -1.0]]), aux_loss_coef=0.1)
    assert np.isfinite(d).all()


@pytest.mark.parametrize("normalize", [True, False])
def test_sqrt_softplus_layer_gradients(normalize):
    """Forward and backward of a sqrt-softplus layer with a selection bias, the aux loss (on
    s / sum s) and the z-loss against central differences in float64."""
    layer = pymoe.MoELayer(6, 5, 8, 2, None, score="sqrtsoftplus", normalize=normalize,
                           scaling_factor=1.5, expert_bias=np.linspace(-0.2, 0.2, 8),
                           aux_loss_coef=0.1, z_loss_coef=0.01, dtype=np.float64,
                           backend="numpy", activation="swiglu")
    randomize(layer, 0)
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal((7, 6)), rng.standard_normal((7, 6))
    errors = check_layer_gradients(layer, x, dy)
    assert max(errors.values()) < FD_RTOL, errors


def test_hash_layer_gradients_and_selection():
    """A hash-routed layer: the experts are table[ids] (the router weights cannot change them),
    and every gradient (router, experts, shared expert, x) matches central differences."""
    E, K, V = 6, 2, 5
    table = np.array([[0, 1], [2, 3], [4, 5], [5, 0], [1, 3]])
    layer = pymoe.MoELayer(4, 3, E, K, preset="deepseek-v4", hash_table=table,
                           dtype=np.float64, backend="numpy", aux_loss_coef=0.1)
    randomize(layer, 2)
    rng = np.random.default_rng(3)
    x, dy = rng.standard_normal((9, 4)), rng.standard_normal((9, 4))
    ids = rng.integers(0, V, size=9)

    def objective() -> float:
        return float(np.sum(layer.forward(x, token_ids=ids) * dy)) + layer.loss_terms()

    objective()
    np.testing.assert_array_equal(layer.routing.expert_index, table[ids])
    dx = layer.backward(dy)
    grads = {n: g.copy() for n, g in layer.grads.items()}
    assert rel_error(dx, numerical_grad(objective, x)) < FD_RTOL
    for name, p in layer.params.items():
        assert rel_error(grads[name], numerical_grad(objective, p)) < FD_RTOL, name
    # [B, S] ids for [B, S, D] tokens, flattened alike
    y = layer.forward(x[:8].reshape(2, 4, 4), token_ids=ids[:8].reshape(2, 4))
    np.testing.assert_array_equal(y.reshape(8, 4), layer.forward(x[:8], token_ids=ids[:8]))


def test_hash_arguments_are_checked():
    table = np.array([[0, 1], [2, 3]])
    L = np.zeros((3, 4))
    ids = np.array([0, 1, 1])
    with pytest.raises(ValueError, match="token_ids: expected entries in"):
        pymoe.route(L, 2, hash_table=table, token_ids=np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="token_ids: expected an integer array"):
        pymoe.route(L, 2, hash_table=table, token_ids=np.array([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="token_ids: expected shape"):
        pymoe.route(L, 2, hash_table=table, token_ids=np.array([0, 1]))
    with pytest.raises(ValueError, match="token_ids: hash routing"):
        pymoe.route(L, 2, hash_table=table)
    with pytest.raises(ValueError, match="token_ids: only read by hash routing"):
        pymoe.route(L, 2, token_ids=ids)
    with pytest.raises(ValueError, match="hash_table: token id 1 lists an expert twice"):
        pymoe.route(L, 2, hash_table=np.array([[0, 1], [2, 2]]), token_ids=ids)
    with pytest.raises(ValueError, match=r"hash_table: expected shape \[V, K\]"):
        pymoe.route(L, 2, hash_table=np.array([[0, 1, 2]]), token_ids=ids)
    with pytest.raises(ValueError, match="hash_table: expected entries in"):
        pymoe.route(L, 2, hash_table=np.array([[0, 4]]), token_ids=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="replay: hash routing already fixes"):
        pymoe.route(L, 2, hash_table=table, token_ids=ids, replay=table[ids])
    with pytest.raises(ValueError, match="expert_bias: hash routing"):
        pymoe.route(L, 2, hash_table=table, token_ids=ids, expert_bias=np.zeros(4))
    with pytest.raises(ValueError, match="expert_bias: hash routing"):
        pymoe.MoELayer(4, 3, 4, 2, hash_table=table, expert_bias=np.zeros(4))
    with pytest.raises(ValueError, match="hash_table: hash routing runs with token_groups"):
        pymoe.MoELayer(4, 3, 4, 2, hash_table=table, token_groups=2)
    layer = pymoe.MoELayer(4, 3, 4, 2, hash_table=table)
    with pytest.raises(ValueError, match="token_ids: hash routing"):
        layer.forward(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="token_ids: only read by hash routing"):
        pymoe.MoELayer(4, 3, 4, 2).forward(np.zeros((3, 4), np.float32), token_ids=ids)
