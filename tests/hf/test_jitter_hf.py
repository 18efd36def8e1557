"""Training-mode jitter that reaches the experts (jitter_experts), against HF's own blocks.

Mixtral (and MiniMax, the same code) multiply the block's input in place by
U(1 - eps, 1 + eps) before the router, so the router and the experts read the same jittered x;
Switch jitters hidden_states.to(router_dtype) in place, which is the caller's tensor (and so the
experts') only when the model runs in the router dtype (float32). The noise draws are made
comparable by drawing HF's own: torch is seeded, the block runs in training mode, torch is seeded
again and the same torch.empty_like(x).uniform_(...) call gives the very multipliers HF used;
pymoe's layer then takes them from a stand-in for its noise generator (its only draw).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from helpers import import_optional

torch = import_optional("torch", "crosscheck")

from tiny import randomize, rel, tiny_model, tolerances  # noqa: E402

import pymoe.hf  # noqa: E402
from pymoe.hf.transformers_block import _find_block  # noqa: E402

EPS = 0.3  # large, so that the jitter changes outputs far beyond round-off


class _HFDraw:
    """Stands in for the layer's numpy Generator: its one uniform() draw returns HF's."""

    def __init__(self, noise: np.ndarray) -> None:
        self.noise = noise

    def uniform(self, low, high, size):
        assert (low, high) == (1 - EPS, 1 + EPS) and tuple(size) == self.noise.shape
        return self.noise


def _train_step(family: str, dtype, jitter_dtype, **overrides):
    """(y, dx, grads) of HF's block and of pymoe's layer, both in training mode with the same
    jitter multipliers; jitter_dtype: the dtype HF draws the noise in."""
    model, cfg = tiny_model(family, 0, **overrides)
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    block = _find_block(model).to(tdt)
    randomize(block, 0)
    block.train()
    rng = np.random.default_rng(0)
    T, D = 32, cfg.hidden_size
    x = rng.standard_normal((T, D)).astype(dtype)
    dy = rng.standard_normal((T, D)).astype(dtype)
    xt = torch.from_numpy(x.copy())[None].requires_grad_(True)
    torch.manual_seed(7)
    out = block(xt * 1)  # a non-leaf copy: HF multiplies its input in place
    y_hf = out[0] if isinstance(out, tuple) else out
    (y_hf * torch.from_numpy(dy)[None]).sum().backward()
    torch.manual_seed(7)
    noise = torch.empty(1, T, D, dtype=jitter_dtype).uniform_(1 - EPS, 1 + EPS)
    layer = pymoe.hf.from_transformers(block, cfg)
    assert layer.jitter_eps == EPS
    layer._noise_rng = _HFDraw(noise[0].numpy().astype(pymoe.router.router_dtype(dtype)))
    y = layer.forward(x, train=True)
    dx = layer.backward(dy)
    hf_grads = {k: p.grad.numpy() for k, p in block.named_parameters() if p.grad is not None}
    ours = pymoe.hf.grad_dict(layer)
    errors = [rel(y, y_hf.detach().numpy().reshape(T, D)), rel(dx, xt.grad.numpy()[0])]
    errors += [rel(ours[k], hf_grads[k]) for k in hf_grads]
    # without the jitter reaching the experts the outputs differ by the jitter's size
    layer2 = pymoe.hf.from_transformers(block, cfg)
    layer2.expert_options = dataclasses.replace(layer2.expert_options, jitter_experts=False)
    layer2._noise_rng = _HFDraw(noise[0].numpy().astype(pymoe.router.router_dtype(dtype)))
    unjittered = rel(layer2.forward(x, train=True), y_hf.detach().numpy().reshape(T, D))
    return layer, max(errors), unjittered


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_mixtral_training_jitter_reaches_the_experts(dtype):
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    layer, err, unjittered = _train_step("mixtral", dtype, tdt, router_jitter_noise=EPS)
    assert layer.jitter_experts
    assert err <= tolerances("mixtral", dtype)[1]  # HF's softmax: a float32 router
    assert unjittered > 1e-2


def test_switch_training_jitter_float32_reaches_the_experts():
    layer, err, unjittered = _train_step("switch_transformers", np.float32, torch.float32,
                                         router_jitter_noise=EPS, dropout_rate=0.0)
    assert layer.jitter_experts
    assert err <= tolerances("switch_transformers", np.float32)[1]
    assert unjittered > 1e-2


def test_switch_training_jitter_float64_stays_in_the_router():
    """A float64 Switch model jitters its float32 router copy only: jitter_experts is off."""
    layer, err, _ = _train_step("switch_transformers", np.float64, torch.float32,
                                router_jitter_noise=EPS, dropout_rate=0.0)
    assert not layer.jitter_experts
    assert err <= tolerances("switch_transformers", np.float64)[1]  # a float32 router
