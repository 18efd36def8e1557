"""HF transformers 5.24 bugs and oddities in the families of pymoe/hf/families/others.py, each
pinned on a literal case: every test asserts what HF does now, so it fails loudly the day HF
changes it (then pymoe.hf's handling, and docs/conventions.md, need a second look)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from helpers import import_optional

torch = import_optional("torch", "crosscheck")
transformers = import_optional("transformers", "crosscheck")

from configs_others import nllb_reference  # noqa: E402
from tiny import randomize, tiny_config, tiny_model  # noqa: E402

import pymoe.hf  # noqa: E402
from pymoe.hf.transformers_block import _find_block  # noqa: E402


def _block(family, seed=0, **overrides):
    model, cfg = tiny_model(family, seed, **overrides)
    block = _find_block(model).to(torch.float64)
    randomize(block, seed)
    return block, cfg


def _x(T=64, D=32, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((1, T, D)))


def test_nllb_experts_forward_runs_experts_0_and_1_only():
    # NllbMoeExperts.forward one-hots the router's [T, E] top-1 MASK (values 0/1), so the
    # "experts" it loops over are the classes 0 and 1: expert_1 gets every token's top-1 gate,
    # expert_0 every token's top-2 gate; experts 2..E-1 never run.
    block, cfg = _block("nllb-moe")
    x = _x()
    with torch.no_grad():
        y = block(x)
        for e in range(2, cfg.num_experts):  # zero every other expert: HF's output is unchanged
            for p in block.experts[f"expert_{e}"].parameters():
                p.zero_()
        assert torch.equal(block(x), y)
        # literally: y = (1 - p) * (gate1 * expert_1(x) + gate2 * expert_0(x))
        h = x[0]
        top1, probs, _ = block.router(h)
        g1 = (probs * top1).sum(-1, keepdim=True)
        g2 = (probs * (1 - top1)).sum(-1, keepdim=True)
        lit = (1 - cfg.moe_token_dropout) * (g1 * block.experts["expert_1"](h)
                                             + g2 * block.experts["expert_0"](h))
        assert torch.allclose(y[0], lit, rtol=1e-12, atol=1e-12)
        # the correct experts give another output; pymoe reproduces that one (test_blocks)
        assert not torch.allclose(nllb_reference(block, x)[0], y)


def test_nllb_random_policy_keeps_the_raw_second_gate():
    # second_expert_policy='random' with normalize_router_prob_before_dropping=True overwrites
    # the renormalised second gate with the raw probability: the gates sum to p1/(p1+p2) + p2.
    cfg = tiny_config("nllb-moe", num_experts=4, second_expert_policy="random",
                      normalize_router_prob_before_dropping=True,
                      moe_eval_capacity_token_fraction=1.0)
    from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeTop2Router
    router = NllbMoeTop2Router(cfg).eval()
    logits = torch.log(torch.tensor([[0.5, 0.45, 0.03, 0.02]]))
    torch.manual_seed(0)  # torch.rand -> 0.496 < 2 * 0.45: the second expert is kept
    _, gates = router.route_tokens(logits.clone(), torch.float32)
    assert gates[0, 0].item() == pytest.approx(0.5 / 0.95, rel=1e-6)
    assert gates[0, 1].item() == pytest.approx(0.45, rel=1e-6)  # raw, not 0.45 / 0.95
    # pymoe reproduces policy 'all' only and says why
    block, cfg2 = _block("nllb-moe")
    fields = {**cfg2.to_dict(), "second_expert_policy": "random"}
    with pytest.raises(ValueError, match="second_expert_policy"):
        pymoe.hf.from_transformers(block, fields)


@pytest.mark.parametrize("sparse", [1, 2])
def test_switch_losses_are_zero_when_every_layer_is_sparse(sparse):
    # SwitchTransformersForConditionalGeneration computes the aux and z losses only when
    # encoder_sparse_step > 1 (same for the decoder): with every layer sparse (step 1) both are
    # the constant 0, silently.
    cfg = tiny_config("switch_transformers", num_sparse_encoder_layers=sparse,
                      num_sparse_decoder_layers=sparse)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.SwitchTransformersForConditionalGeneration(cfg).eval()
    ids = torch.randint(2, cfg.vocab_size, (2, 12))
    out = model(input_ids=ids, decoder_input_ids=ids, output_router_logits=True)
    losses = [float(torch.as_tensor(v).detach()) for v in (
        out.encoder_aux_loss, out.encoder_z_loss, out.decoder_aux_loss, out.decoder_z_loss)]
    if sparse == 2:  # 2 of 2 layers sparse: sparse_step 1
        assert losses == [0.0, 0.0, 0.0, 0.0]
    else:  # 1 of 2: sparse_step 2, the losses are computed
        assert all(v > 0 for v in losses)


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_ocr2", "unlimited_ocr"])
def test_deepseek_v2_never_reads_norm_topk_prob(family):
    # DeepseekV2TopkRouter has no renormalisation: with norm_topk_prob=True the gates are
    # p * routed_scaling_factor, rows summing to less than the factor. pymoe: normalize=False.
    block, cfg = _block(family, norm_topk_prob=True)
    assert cfg.norm_topk_prob is True
    with torch.no_grad():
        logits, w, idx = block.gate(_x()[0])
    p = torch.softmax(logits, -1).gather(1, idx).to(w.dtype)
    assert torch.allclose(w, p * cfg.routed_scaling_factor, rtol=1e-6)
    assert float(w.sum(-1).min()) < 0.9 * cfg.routed_scaling_factor  # renormalised: all = 2.5
    assert pymoe.hf.from_transformers(block, cfg).options.normalize is False


@pytest.mark.parametrize("family", ["deepseek_v2", "mistral4"])
def test_hf_accepts_fewer_group_experts_than_k(family):
    # topk_group * E / n_group < K: 1 group of 2 experts kept, K = 3. HF runs anyway and takes
    # the third expert from a masked group (masked_fill 0.0): DeepSeek-V2 gathers its gate from
    # the masked scores (0.0), Mistral-4 from the real ones (> 0). pymoe refuses the config.
    extra = {"topk_method": "group_limited_greedy"} if family == "deepseek_v2" else {}
    block, cfg = _block(family, num_experts_per_tok=3, n_group=4, topk_group=1, **extra)
    with torch.no_grad():
        _, w, idx = block.gate(_x()[0])
    groups_used = [len(set((row // 2).tolist())) for row in idx]
    assert min(groups_used) >= 2  # every token uses a group outside its one kept group
    if family == "deepseek_v2":
        assert ((w == 0).sum(-1) == 1).all()  # exactly one 0.0 gate per token
    else:
        assert (w > 0).all()
    with pytest.raises(ValueError, match="topk_groups"):
        pymoe.hf.from_transformers(block, cfg)


def test_nllb_eval_capacity_overwrites_expert_capacity():
    # NllbMoeTop2Router.route_tokens in eval assigns self.expert_capacity = ceil(fraction * T):
    # the configured expert_capacity is lost for every later (training) forward.
    block, cfg = _block("nllb-moe", moe_eval_capacity_token_fraction=0.5)
    assert block.router.expert_capacity == 12
    with torch.no_grad():
        block(_x(T=64))
    assert block.router.expert_capacity == math.ceil(0.5 * 64)
