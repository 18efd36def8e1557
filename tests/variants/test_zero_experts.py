"""Zero-computation experts (pymoe.variants.zero_experts): identity experts give gate * x, null
experts 0; both are routed, capacity-limited and counted like real experts."""
from __future__ import annotations

import numpy as np
import pytest

import pymoe
from helpers import check_layer_gradients, randomize
from pymoe.monitor import LoadTracker
from pymoe.options import check_group_extras


def _by_hand_layer(**kw):
    """D = H = 2, E = 3: expert 0 real (relu, w1 = w2 = I, biases 0), expert 1 identity, expert
    2 null; a zero router, so every p = 1/3, and scaling 3: every gate is exactly 1."""
    layer = pymoe.MoELayer(2, 2, 3, 1, None, dtype=np.float64, identity_experts=1,
                           null_experts=1, scaling_factor=3.0, **kw)
    layer.params["w_router"][...] = 0
    layer.params["w1"][0] = np.eye(2)
    layer.params["w2"][0] = np.eye(2)
    return layer


@pytest.mark.parametrize("formulation", ["indexed", "dense"])
def test_by_hand(formulation):
    """Tokens [1, 2], [3, 4], [-5, 6] sent to experts 0, 1, 2 (replay) with gate 1: the real
    expert gives relu([1, 2]) = [1, 2], the identity expert the token [3, 4], the null one 0."""
    layer = _by_hand_layer(formulation=formulation)
    x = np.array([[1.0, 2.0], [3.0, 4.0], [-5.0, 6.0]])
    y = layer.forward(x, replay=np.array([[0], [1], [2]]))
    np.testing.assert_array_equal(y, [[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_array_equal(layer.routing.expert_load, [1, 1, 1])  # counted in the loads
    assert layer.params["w1"].shape == (1, 2, 2)  # only the real expert has weights
    dx = layer.backward(np.ones((3, 2)))
    # the identity expert passes dy * gate = 1 through; the null one none (the router gets the
    # rest: with w_router = 0 its dx share is 0 here, the aux loss reaches only w_router)
    np.testing.assert_allclose(dx[1], [1.0, 1.0], atol=1e-15)
    np.testing.assert_allclose(dx[2], [0.0, 0.0], atol=1e-15)


@pytest.mark.parametrize("formulation,backend,gate_input", [
    ("indexed", "numpy", False), ("indexed", "c", False), ("dense", "numpy", False),
    ("indexed", "numpy", True), ("dense", "numpy", True)])
def test_gradients_match_finite_differences(formulation, backend, gate_input):
    if backend == "c" and not pymoe.get_backend("auto").name == "c":
        pytest.skip("the C core is not built")
    layer = pymoe.MoELayer(5, 4, 6, 2, 1.5, dtype=np.float64, identity_experts=2, null_experts=1,
                           activation="swiglu", formulation=formulation, backend=backend,
                           gate_input=gate_input, seed=2)
    randomize(layer, 4)
    rng = np.random.default_rng(7)
    x, dy = rng.standard_normal((9, 5)), rng.standard_normal((9, 5))
    errors = check_layer_gradients(layer, x, dy)
    assert max(errors.values()) < 1e-6, errors
    chosen = np.bincount(layer.routing.expert_index.ravel(), minlength=6)
    assert chosen[3:].sum() > 0  # the zero-computation experts were chosen


def test_backends_and_formulations_agree():
    """C and NumPy (dispatch/combine are bitwise; the expert matmuls are the same NumPy calls)
    give the same bits; the dense formulation the same values to round-off."""
    if pymoe.get_backend("auto").name != "c":
        pytest.skip("the C core is not built")
    x = np.random.default_rng(0).standard_normal((16, 6)).astype(np.float32)
    kw = dict(identity_experts=1, null_experts=1, seed=5, dtype=np.float32)
    ys = [pymoe.MoELayer(6, 5, 4, 2, 1.0, backend=b, **kw).forward(x) for b in ("numpy", "c")]
    np.testing.assert_array_equal(ys[0], ys[1])
    dense = pymoe.MoELayer(6, 5, 4, 2, 1.0, formulation="dense", **kw).forward(x)
    # float32 sums in another order: a few ulps of the largest output
    np.testing.assert_allclose(dense, ys[0], atol=1e-5 * np.abs(ys[0]).max())


def test_loads_and_aux_loss_count_them():
    """A router that prefers the identity expert sends the tokens there: the load, the aux loss
    and the monitor see it as any expert."""
    layer = pymoe.MoELayer(4, 3, 3, 1, None, dtype=np.float64, identity_experts=1, seed=0)
    layer.params["b_router"][...] = [0.0, 0.0, 5.0]
    x = np.random.default_rng(1).standard_normal((10, 4)) * 0.01
    y = layer.forward(x)
    assert layer.routing.expert_load.tolist() == [0, 0, 10]
    gate = layer.routing.gate[:, 0]
    np.testing.assert_allclose(y, gate[:, None] * x, rtol=1e-15)
    assert layer.aux_loss > 2.5  # all tokens on one expert: E * f_e * P_e, near 3
    stats = LoadTracker().record(layer.routing, step=0)
    assert stats.load.tolist() == [0, 0, 10]


def test_refusals_name_the_keyword():
    with pytest.raises(ValueError, match="identity_experts"):
        pymoe.MoELayer(4, 3, 3, 1, identity_experts=2, null_experts=1)
    with pytest.raises(ValueError, match="null_experts"):
        pymoe.MoELayer(4, 3, 3, 1, null_experts=-1)
    with pytest.raises(ValueError, match="identity_experts: not supported with token groups"):
        pymoe.MoELayer(4, 3, 4, 1, identity_experts=1, token_groups=2)
    layer = pymoe.MoELayer(4, 3, 4, 1, null_experts=1)
    with pytest.raises(ValueError, match="null_experts: not supported with token groups or "
                                         "expert parallelism"):  # what ExpertParallelMoE raises
        check_group_extras("layer", layer.expert_options)
