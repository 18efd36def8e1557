"""Cross-check: pymoe.losses.GlobalLoadBalance against Megatron-Core 0.16.1's global aux loss,
on CPU: TopKRouter._apply_global_aux_loss itself (its running global_tokens_per_expert and
ga_steps buffers, get_tokens_per_expert_and_token_count, switch_load_balancing_loss_func), called
on a stand-in for the router object that holds what the method reads: one rank (a group of size
1, for which Megatron's all-reduce is the identity; without torch.distributed initialised,
Megatron's get_tensor_model_parallel_group_if_none would replace any group by None, so the tests
make it pass the group through, what it does when torch.distributed is up without
parallel_state), coefficient 1, the loss captured where
attach_and_log_load_balancing_loss would attach it. The scores and routing map are
compute_routing_scores_for_aux_loss's, as TopKRouter.routing passes them.

Equal micro-batches: the values agree to float32 round-off (crosscheck.aux_tol) and the
gradients w.r.t. the logits to 2e-6 relative to their largest entry. Unequal micro-batches:
Megatron divides the mean count over micro-batches by the current micro-batch's token count
(Megatron-LM #7213), pinned on a literal case.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import pymoe
from crosscheck import aux_tol
from helpers import import_optional
from pymoe.losses import GlobalLoadBalance

torch = import_optional("torch", "crosscheck")
moe_utils = import_optional("megatron.core.transformer.moe.moe_utils", "crosscheck")
router_mod = import_optional("megatron.core.transformer.moe.router", "crosscheck")
mappings = import_optional("megatron.core.tensor_parallel.mappings", "crosscheck")

GRAD_TOL = 2e-6  # float32 gradients: a few roundings of E * f_e / T through the softmax


@pytest.fixture(autouse=True)
def _group_passes_through(monkeypatch):
    monkeypatch.setattr(mappings, "get_tensor_model_parallel_group_if_none",
                        lambda group, *args, **kwargs: group)


class _OneRank:
    def size(self) -> int:
        return 1


class MegatronGlobalAux:
    """The state TopKRouter keeps for global_aux_loss, and its method run on that state."""

    def __init__(self, E: int, k: int) -> None:
        self.topk = k
        self.config = SimpleNamespace(num_moe_experts=E, moe_router_fusion=False)
        self.tp_dp_cp_group = _OneRank()
        self.global_tokens_per_expert = torch.zeros(E, dtype=torch.float32)
        self.ga_steps = torch.tensor(0, dtype=torch.float32)
        self.captured = None

    def get_aux_loss_coeff(self, name: str) -> float:
        return 1.0 if name == "global_aux_loss" else 0.0

    def attach_and_log_load_balancing_loss(self, probs, coeff, loss, *args, **kwargs):
        self.captured = loss
        return probs

    def micro_batch(self, logits: np.ndarray) -> tuple[float, np.ndarray]:
        """(global aux loss, d loss / d logits) of one micro-batch, as Megatron computes them."""
        x = torch.from_numpy(logits.copy()).requires_grad_(True)
        routing_map, scores = moe_utils.compute_routing_scores_for_aux_loss(x, self.topk,
                                                                            "softmax")
        router_mod.TopKRouter._apply_global_aux_loss(self, scores, scores, routing_map)
        self.captured.backward()
        return float(self.captured.detach()), x.grad.numpy().astype(np.float64)

    def reset(self) -> None:
        router_mod.TopKRouter.reset_global_aux_loss_tracker(self)


def _ours(g: GlobalLoadBalance, logits: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    r = pymoe.route(logits, k, None)
    g.update(r)
    return g.loss(r), g.loss_backward(r, 1.0).astype(np.float64)


@pytest.mark.parametrize("k", [1, 2])
def test_equal_micro_batches(k):
    """Four micro-batches of 32 tokens with different routing skews, then a reset and two more:
    after each, the same loss and gradient (K = 1 needs nothing special here: the aux scores are
    the full softmax either way)."""
    E, T = 8, 32
    rng = np.random.default_rng(11)
    theirs, ours = MegatronGlobalAux(E, k), GlobalLoadBalance(E, k)
    for step in range(6):
        if step == 4:
            theirs.reset()
            ours.reset()
        logits = (rng.normal(size=(T, E)) + np.linspace(0, step, E)).astype(np.float32)
        (lt, dt), (lo, do) = theirs.micro_batch(logits), _ours(ours, logits, k)
        np.testing.assert_array_equal(theirs.global_tokens_per_expert.numpy(),
                                      ours.tokens_per_expert)
        assert abs(lo - lt) <= aux_tol(np.float32, T) * max(1.0, abs(lt)), (step, lo, lt)
        assert np.max(np.abs(do - dt)) <= GRAD_TOL * np.max(np.abs(dt)), step


def test_unequal_micro_batches_megatron_divides_by_the_current_count():
    """Literal case, E = 2, K = 1: micro-batch 1 has 4 tokens all on expert 0, micro-batch 2 has
    2 tokens, one on each expert. Counts N = (5, 1) over 6 tokens.
    pymoe:    f = N / (K * 6)                 = (5/6, 1/6).
    Megatron: f = (N / ga_steps) / (K * T_2)  = (5/2, 1/2) / 2 = (5/4, 1/4): the mean count per
    micro-batch over the current (smaller) micro-batch's size, which sums to 1.5, not 1.
    Micro-batch 2's P = (1/2, 1/2) (its rows are mirror images), so pymoe's loss is
    2 * (5/6 + 1/6) / 2 = 1 and Megatron's 2 * (5/4 + 1/4) / 2 = 1.5."""
    first = np.array([[2.0, 0.0]] * 4, np.float32)
    second = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    theirs, ours = MegatronGlobalAux(2, 1), GlobalLoadBalance(2, 1)
    theirs.micro_batch(first)
    _ours(ours, first, 1)
    lt, _ = theirs.micro_batch(second)
    lo, _ = _ours(ours, second, 1)
    np.testing.assert_array_equal(ours.tokens_per_expert, [5, 1])
    np.testing.assert_array_equal(theirs.global_tokens_per_expert.numpy(), [5, 1])
    np.testing.assert_array_equal(ours.fraction, [5 / 6, 1 / 6])
    assert lo == pytest.approx(1.0, abs=2e-7)
    assert lt == pytest.approx(1.5, abs=2e-7)
