"""pymoe.SoftMoELayer against lucidrains' soft-moe-pytorch (`soft_moe_pytorch.SoftMoE`, the
crosscheck extra), run on the same weights in float64: forward, dx and every parameter gradient.

Parameter map (theirs -> pymoe): norm.gamma -> norm_weight, slot_norm.gamma -> slot_norm_weight,
slot_embeds [E, S, D] -> slot_embeds, experts.experts[e][0] (Linear D->H) .weight.T / .bias ->
w1[e] / b1[e], experts.experts[e][3] (Linear H->D) -> w2[e] / b2[e].

Their experts use the exact (erf) GELU; pymoe's "gelu" form is the tanh one (GPT-2's), so the test
swaps their activation module for nn.GELU(approximate="tanh") (and nn.ReLU for "relu"): the rest
of their forward (RMSNorm, the two softmaxes, the slot and output einsums) runs as shipped.
"""
import numpy as np
import pytest

import pymoe
from helpers import import_optional

torch = import_optional("torch", "crosscheck")
soft_moe_pytorch = import_optional("soft_moe_pytorch", "crosscheck")

# float64 on both sides; the same sums in a different order (einsum vs matmul, norm via sqrt of
# a sum of squares) differ by a few ulps per step, amplified by at most the layer's few matmuls:
# 1e-12 relative (norm-wise) leaves three orders of margin over what is seen (~1e-15).
RTOL = 1e-12


def their_layer(D, H, E, S, activation):
    torch.manual_seed(0)
    theirs = soft_moe_pytorch.SoftMoE(dim=D, num_experts=E, num_slots=S, expert_mult=H / D,
                                      offload_unused_experts_to_cpu=False).double()
    for ffn in theirs.experts.experts:
        ffn[1] = torch.nn.GELU(approximate="tanh") if activation == "gelu" else torch.nn.ReLU()
    return theirs


def load_params(ours, theirs):
    """Theirs -> ours; their init is random, and the norm gains are moved off 1 so that their
    gradients are tested too."""
    rng = np.random.default_rng(1)
    with torch.no_grad():
        theirs.norm.gamma.add_(torch.from_numpy(rng.normal(0, 0.2, ours.d_model)))
        theirs.slot_norm.gamma.add_(torch.from_numpy(rng.normal(0, 0.2, ours.d_model)))
        for ffn in theirs.experts.experts:
            ffn[0].bias.add_(torch.from_numpy(rng.normal(0, 0.1, ffn[0].bias.shape)))
    p = ours.params
    p["norm_weight"][...] = theirs.norm.gamma.detach().numpy()
    p["slot_norm_weight"][...] = theirs.slot_norm.gamma.detach().numpy()
    p["slot_embeds"][...] = theirs.slot_embeds.detach().numpy()
    for e, ffn in enumerate(theirs.experts.experts):
        p["w1"][e] = ffn[0].weight.detach().numpy().T
        p["b1"][e] = ffn[0].bias.detach().numpy()
        p["w2"][e] = ffn[3].weight.detach().numpy().T
        p["b2"][e] = ffn[3].bias.detach().numpy()


def rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("B, N, E, S", [(2, 6, 3, 2), (1, 5, 4, 1)])
def test_soft_moe_matches_soft_moe_pytorch(activation, B, N, E, S):
    D, H = 8, 16
    theirs = their_layer(D, H, E, S, activation)
    ours = pymoe.SoftMoELayer(D, H, E, S, activation=activation, dtype=np.float64)
    load_params(ours, theirs)
    rng = np.random.default_rng(2)
    x, dy = rng.normal(size=(B, N, D)), rng.normal(size=(B, N, D))

    xt = torch.from_numpy(x).requires_grad_()
    yt = theirs(xt)
    (yt * torch.from_numpy(dy)).sum().backward()
    y = ours(x)
    dx = ours.backward(dy)

    assert rel(y, yt.detach().numpy()) <= RTOL
    assert rel(dx, xt.grad.numpy()) <= RTOL
    g = ours.grads
    pairs = {"norm_weight": theirs.norm.gamma.grad, "slot_norm_weight": theirs.slot_norm.gamma.grad,
             "slot_embeds": theirs.slot_embeds.grad}
    for e, ffn in enumerate(theirs.experts.experts):
        for name, ref in (("w1", ffn[0].weight.grad.T), ("b1", ffn[0].bias.grad),
                          ("w2", ffn[3].weight.grad.T), ("b2", ffn[3].bias.grad)):
            assert rel(g[name][e], ref.numpy()) <= RTOL, (name, e)
    for name, ref in pairs.items():
        assert rel(g[name], ref.numpy()) <= RTOL, name
