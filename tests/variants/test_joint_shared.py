"""Joint normalisation of routed and router-scored shared experts (shared_router_scored,
pymoe.variants.joint_shared; Inkling)."""
from __future__ import annotations

import numpy as np
import pytest

import pymoe
from helpers import c_layer_agrees_with_numpy, check_layer_gradients, randomize


def test_by_hand():
    """E = 2 routed + S = 1 shared expert, K = 1, D = H = 2, relu, identity weights except the
    shared expert's w1 = 2I. Router logits [ln 3, 0 | 0]: s = [3/4, 1/2 | 1/2]; expert 0 is
    chosen; 3/4 and the shared 1/2 share the sum 5/4, so with c = 2.5 * 2 = 5 the routed gate is
    5 * 0.6 = 3 and the shared weight 5 * 0.4 = 2. For x = [1, 2]: y = 3 [1, 2] + 2 [2, 4]."""
    layer = pymoe.MoELayer(2, 2, 2, 1, None, dtype=np.float64, score="sigmoid",
                           scaling_factor=2.5, num_shared_experts=1, shared_router_scored=True)
    p = layer.params
    assert p["w_router"].shape == (2, 3) and p["global_scale"].shape == (1,)
    p["w_router"][...] = 0
    p["b_router"][...] = [np.log(3.0), 0.0, 0.0]
    p["global_scale"][...] = 2.0
    p["w1"][...] = np.eye(2)
    p["w2"][...] = np.eye(2)
    p["shared_w1"][0] = 2 * np.eye(2)
    p["shared_w2"][0] = np.eye(2)
    y = layer.forward(np.array([[1.0, 2.0]]))
    np.testing.assert_allclose(y, [[7.0, 14.0]], rtol=1e-14)  # round-off of sigmoid(ln 3) only
    assert layer.routing.expert_index.tolist() == [[0]]


def _inkling_layer(**kw):
    layer = pymoe.MoELayer(5, 4, 6, 2, None, dtype=np.float64, preset="inkling",
                           expert_bias=np.linspace(-0.3, 0.3, 6), seed=1, **kw)
    randomize(layer, 3)
    layer.params["global_scale"][...] = 0.7
    return layer


def test_gradients_match_finite_differences():
    layer = _inkling_layer(backend="numpy")
    rng = np.random.default_rng(0)
    errors = check_layer_gradients(layer, rng.standard_normal((7, 5)),
                                   rng.standard_normal((7, 5)))
    assert max(errors.values()) < 1e-6, errors


def test_c_backend_matches_numpy():
    """dispatch/combine/gate_grad in C are bitwise NumPy's except the gate gradient's dot
    product (summed in another order: helpers' DOWNSTREAM_RTOL for what follows it)."""
    if pymoe.get_backend("auto").name != "c":
        pytest.skip("the C core is not built")
    c_layer_agrees_with_numpy(lambda backend: _inkling_layer(backend=backend))


def test_refusals_name_the_keyword():
    base = dict(score="sigmoid", num_shared_experts=1, shared_router_scored=True)
    for extra, name in ((dict(normalize=True), "normalize"), (dict(score="softmax"), "score"),
                        (dict(formulation="dense"), "formulation"),
                        (dict(shared_expert_gate=True), "shared_expert_gate"),
                        (dict(num_shared_experts=0), "num_shared_experts")):
        with pytest.raises(ValueError, match=f"shared_router_scored: needs {name}"):
            pymoe.MoELayer(4, 3, 4, 2, **{**base, **extra})
    with pytest.raises(ValueError, match="shared_router_scored: not supported with token groups"):
        pymoe.MoELayer(4, 3, 4, 2, token_groups=2, **base)
