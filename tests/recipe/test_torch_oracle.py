"""Cross-check MoELayer forward and backward against a PyTorch autograd implementation (float64).

helpers.torch_moe is the oracle: torch index ops and autograd, one expert at a time over its kept
tokens. The benchmark's torch layer (pymoe.bench.torch_peer.torch_layer, batched over experts) is
checked here too, so that the peer the benchmark times computes pymoe's layer."""
import numpy as np
import pytest

import pymoe
from helpers import randomize

torch = pytest.importorskip("torch", reason="torch not installed (pip install torch, for "
                                            "the autograd cross-check)")
from helpers import torch_moe  # noqa: E402
from pymoe.bench.torch_peer import torch_layer  # noqa: E402

D, H, E, K, CF = 6, 10, 4, 2, 0.75


def _stepped_layer(T: int, seeds: tuple[int, int], **kw):
    """A float64 MoELayer (D, H, E, K, CF above) with randomized parameters after one forward and
    backward on normal x, dy of T tokens that drop some pairs: (layer, x, dy, y, dx)."""
    layer = pymoe.MoELayer(D, H, E, K, CF, dtype=np.float64, seed=0, **kw)
    randomize(layer, seed=seeds[0])
    rng = np.random.default_rng(seeds[1])
    x, dy = rng.normal(size=(T, D)), rng.normal(size=(T, D))
    y = layer.forward(x)
    dx = layer.backward(dy)
    assert layer.routing.dropped_fraction > 0
    return layer, x, dy, y, dx


def _assert_matches(layer, y, dx, ty, aux, tx, tp) -> None:
    """torch's output, aux loss, input gradient and parameter gradients are the layer's."""
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=0, atol=1e-12)
    assert layer.aux_loss == pytest.approx(aux.item(), rel=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=0, atol=1e-11)
    for name, g in layer.grads.items():
        np.testing.assert_allclose(g, tp[name].grad.numpy(), rtol=0, atol=1e-11, err_msg=name)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("formulation", ["indexed", "dense"])
def test_matches_torch_autograd(normalize, activation, formulation):
    layer, x, dy, y, dx = _stepped_layer(32, (6, 7), normalize=normalize, activation=activation,
                                         aux_loss_coef=0.2, z_loss_coef=0.03,
                                         formulation=formulation)
    tx, tp, ty, aux, z = torch_moe(layer.params, x, K, CF, normalize, activation)
    (torch.sum(ty * torch.tensor(dy)) + 0.2 * aux + 0.03 * z).backward()
    _assert_matches(layer, y, dx, ty, aux, tx, tp)
    assert layer.z_loss == pytest.approx(z.item(), rel=1e-12)


def test_benchmark_torch_layer_computes_the_layer():
    """The benchmark's batched torch peer: same output, input gradient and parameter gradients as
    MoELayer (relu, raw gates, aux loss coefficient 0.01, the benchmark's settings), in float64."""
    layer, x, dy, y, dx = _stepped_layer(40, (3, 4), aux_loss_coef=0.01)
    step = torch_layer(layer.params, x, dy, K, CF, 0.01)
    for _ in range(2):  # a second call starts from cleared gradients, as each benchmark call does
        ty, aux, tx, tp = step()
    _assert_matches(layer, y, dx, ty, aux, tx, tp)
