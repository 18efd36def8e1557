"""Cross-check MoELayer forward and backward against a PyTorch autograd implementation (float64)."""
import numpy as np
import pytest

import pymoe
from gradcheck import randomize

torch = pytest.importorskip("torch", reason="torch not installed (pip install torch==2.13.0 for "
                                            "the autograd cross-check)")


def torch_moe(params, x, k, cf, normalize, activation, aux_coef, z_coef):
    """An MoE layer in torch index ops: topk, cumsum slots, index_select / index_add_."""
    p = {n: torch.tensor(v, requires_grad=True) for n, v in params.items()}
    x = torch.tensor(x, requires_grad=True)
    T, D = x.shape
    E = p["w_router"].shape[1]
    logits = x @ p["w_router"] + p["b_router"]
    probs = torch.softmax(logits, dim=-1)
    gate, idx = torch.topk(probs, k, dim=-1)  # random data: no ties
    if normalize:
        gate = gate / gate.sum(-1, keepdim=True)
    cap = min(int(np.ceil(k * T * cf / E)), T) if cf is not None else T
    mask = torch.nn.functional.one_hot(idx.t().reshape(-1), E)  # [K*T, E] choice-major
    pos = ((torch.cumsum(mask, 0) - 1) * mask).sum(-1).reshape(k, T).t()  # [T, K]
    kept = pos < cap
    y = torch.zeros_like(x)
    act = torch.relu if activation == "relu" else (lambda a: torch.nn.functional.gelu(a, approximate="tanh"))
    for e in range(E):
        t_idx, j_idx = torch.nonzero((idx == e) & kept, as_tuple=True)
        if len(t_idx) == 0:
            continue
        h = act(x.index_select(0, t_idx) @ p["w1"][e] + p["b1"][e])
        out = h @ p["w2"][e] + p["b2"][e]
        y = y.index_add(0, t_idx, out * gate[t_idx, j_idx][:, None])
    counts = torch.bincount(idx.reshape(-1), minlength=E).double()
    aux = E * torch.sum(counts / (T * k) * probs.mean(0))
    z = torch.mean(torch.logsumexp(logits, -1) ** 2)
    return x, p, y, aux, z


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

    tx, tp, ty, aux, z = torch_moe(layer.params, x, K, cf, normalize, activation, 0.2, 0.03)
    (torch.sum(ty * torch.tensor(dy)) + 0.2 * aux + 0.03 * z).backward()
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=0, atol=1e-12)
    assert layer.aux_loss == pytest.approx(aux.item(), rel=1e-12)
    assert layer.z_loss == pytest.approx(z.item(), rel=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=0, atol=1e-11)
    for name, g in layer.grads.items():
        np.testing.assert_allclose(g, tp[name].grad.numpy(), rtol=0, atol=1e-11, err_msg=name)
