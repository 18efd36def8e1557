"""Cross-check MoELayer forward and backward against a PyTorch autograd implementation (float64).

helpers.torch_moe is the oracle: torch index ops and autograd, one expert at a time over its kept
tokens. The benchmark's torch layer (pymoe.bench.torch_peer.torch_layer, batched over experts) is
checked here too, so that the peer the benchmark times computes pymoe's layer."""
import numpy as np
import pytest

import pymoe
from helpers import randomize

torch = pytest.importorskip("torch", reason="torch not installed (pip install torch==2.13.0 for "
                                            "the autograd cross-check)")
from helpers import torch_moe  # noqa: E402
from pymoe.bench.torch_peer import torch_layer  # noqa: E402


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("formulation", ["indexed", "dense"])
def test_matches_torch_autograd(normalize, activation, formulation):
    T, D, H, E, K, cf = 32, 6, 10, 4, 2, 0.75
    layer = pymoe.MoELayer(D, H, E, K, cf, normalize=normalize, activation=activation,
                           aux_loss_coef=0.2, z_loss_coef=0.03, formulation=formulation,
                           dtype=np.float64, seed=0)
    randomize(layer, seed=6)
    rng = np.random.default_rng(7)
    x, dy = rng.normal(size=(T, D)), rng.normal(size=(T, D))
    y = layer.forward(x)
    dx = layer.backward(dy)
    assert layer.routing.dropped_fraction > 0

    tx, tp, ty, aux, z = torch_moe(layer.params, x, K, cf, normalize, activation)
    (torch.sum(ty * torch.tensor(dy)) + 0.2 * aux + 0.03 * z).backward()
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=0, atol=1e-12)
    assert layer.aux_loss == pytest.approx(aux.item(), rel=1e-12)
    assert layer.z_loss == pytest.approx(z.item(), rel=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=0, atol=1e-11)
    for name, g in layer.grads.items():
        np.testing.assert_allclose(g, tp[name].grad.numpy(), rtol=0, atol=1e-11, err_msg=name)


def test_benchmark_torch_layer_computes_the_layer():
    """The benchmark's batched torch peer: same output, input gradient and parameter gradients as
    MoELayer (relu, raw gates, aux loss coefficient 0.01, the benchmark's settings), in float64."""
    T, D, H, E, K, cf = 40, 6, 10, 4, 2, 0.75
    layer = pymoe.MoELayer(D, H, E, K, cf, aux_loss_coef=0.01, dtype=np.float64, seed=0)
    randomize(layer, seed=3)
    rng = np.random.default_rng(4)
    x, dy = rng.normal(size=(T, D)), rng.normal(size=(T, D))
    y = layer.forward(x)
    dx = layer.backward(dy)
    assert layer.routing.dropped_fraction > 0
    step = torch_layer(layer.params, x, dy, K, cf, 0.01)
    for _ in range(2):  # a second call starts from cleared gradients, as each benchmark call does
        ty, aux, tx, tp = step()
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=0, atol=1e-12)
    assert layer.aux_loss == pytest.approx(aux.item(), rel=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=0, atol=1e-11)
    for name, g in layer.grads.items():
        np.testing.assert_allclose(g, tp[name].grad.numpy(), rtol=0, atol=1e-11, err_msg=name)
