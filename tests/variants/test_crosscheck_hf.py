"""Cross-check: pymoe against the routers of HF transformers' MoE model files, run on CPU.

Each router is built from a tiny config with hidden_size = E and an identity router weight, so
the hidden states it is given are the logits. The load-balancing loss is the model file's own
load_balancing_loss_func on that one layer's logits. docs/conventions.md lists what each model
does; crosscheck.py says how results are compared.
"""
from __future__ import annotations

import numpy as np
import pytest

import pymoe
from crosscheck import CASES, Outcome, assert_same, combine_from_slots, ours, tied_logits
from helpers import import_optional

torch = import_optional("torch", "crosscheck")
transformers = import_optional("transformers", "crosscheck")
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_deepseek_v3  # noqa: E402
from transformers.models.gpt_oss import modeling_gpt_oss  # noqa: E402
from transformers.models.mixtral import modeling_mixtral  # noqa: E402
from transformers.models.nllb_moe import modeling_nllb_moe as hf_nllb  # noqa: E402
from transformers.models.olmoe import modeling_olmoe  # noqa: E402
from transformers.models.qwen2_moe import modeling_qwen2_moe  # noqa: E402
from transformers.models.qwen3_moe import modeling_qwen3_moe  # noqa: E402
from transformers.models.switch_transformers import modeling_switch_transformers as hf_switch  # noqa: E402

T = 48
DTYPES = {np.float32: torch.float32, np.float64: torch.float64}


def _identity(weight) -> None:
    with torch.no_grad():
        weight.copy_(torch.eye(weight.shape[0], dtype=weight.dtype))


def _pairs(T: int, E: int, index, values) -> tuple[np.ndarray, np.ndarray]:
    """[T, K] expert indices and values -> (<bool>[T, E] chosen, [T, E] value)."""
    index = index.detach().numpy()
    chosen = np.zeros((T, E), bool)
    gate = np.zeros((T, E))
    rows = np.repeat(np.arange(T), index.shape[1])
    chosen[rows, index.ravel()] = True
    gate[rows, index.ravel()] = values.detach().double().numpy().ravel()
    return chosen, gate


# -------------------------------------------------------------- top-K routers (dropless)
# system -> (module, config class, config keywords); E and K are filled in per test.
TOPK = {
    "mixtral": (modeling_mixtral, "MixtralConfig", "MixtralTopKRouter", {}),
    "qwen2-moe": (modeling_qwen2_moe, "Qwen2MoeConfig", "Qwen2MoeTopKRouter",
                  {"norm_topk_prob": False}),
    "qwen3-moe": (modeling_qwen3_moe, "Qwen3MoeConfig", "Qwen3MoeTopKRouter",
                  {"norm_topk_prob": True}),
    "olmoe": (modeling_olmoe, "OlmoeConfig", "OlmoeTopKRouter", {"norm_topk_prob": False}),
    "gpt-oss": (modeling_gpt_oss, "GptOssConfig", "GptOssTopKRouter", {}),
}
# (E, K) as small as the published shape allows: Mixtral 8 experts top-2, Qwen1.5-MoE top-4,
# Qwen3-MoE and OLMoE top-8, gpt-oss top-4.
SHAPES = {"mixtral": (8, 2), "qwen2-moe": (8, 4), "qwen3-moe": (16, 8), "olmoe": (16, 8),
          "gpt-oss": (8, 4)}
# These compute the router softmax in float32 whatever the input dtype (`.float()` or
# dtype=torch.float in the router), so only float32 is compared; gpt-oss keeps the input dtype.
# load_balancing_loss_func sums in float32 for every model.
TOPK_RUNS = [(s, np.float32) for s in TOPK] + [("gpt-oss", np.float64)]


def hf_topk(system: str, logits: np.ndarray, k: int) -> Outcome:
    module, config_name, router_name, extra = TOPK[system]
    T_, E = logits.shape
    cfg = getattr(transformers, config_name)(hidden_size=E, num_experts=E, num_local_experts=E,
                                             num_experts_per_tok=k, **extra)
    router = getattr(module, router_name)(cfg).to(DTYPES[logits.dtype.type])
    _identity(router.weight)
    if getattr(router, "bias", None) is not None:
        with torch.no_grad():
            router.bias.zero_()
    with torch.no_grad():
        router_logits, scores, index = router(torch.from_numpy(logits))
        aux = module.load_balancing_loss_func((router_logits,), E, k)
    chosen, gate = _pairs(T_, E, index, scores)
    return Outcome(chosen, chosen.copy(), gate, aux=float(aux))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("system, dtype", TOPK_RUNS)
def test_topk_routers(system, dtype, case):
    E, K = SHAPES[system]
    logits = tied_logits(T, E, dtype, k=K) if case == "ties" else CASES[case](T, E, dtype)
    assert_same(ours(system, logits, K, None), hf_topk(system, logits, K), dtype, system,
                aux_dtype=np.float32)


# ------------------------------------------------------------------ Switch Transformers

def hf_switch_router(logits: np.ndarray, capacity: int) -> Outcome:
    """SwitchTransformersTop1Router on one sequence [1, T, E] with a fixed expert_capacity; aux
    loss as SwitchTransformersForConditionalGeneration computes it from the router logits."""
    T_, E = logits.shape
    cfg = transformers.SwitchTransformersConfig(
        d_model=E, num_experts=E, expert_capacity=capacity, router_bias=False,
        router_dtype="float32")  # its config takes float32, float16 or bfloat16 only
    router = hf_switch.SwitchTransformersTop1Router(cfg).eval()
    _identity(router.classifier.weight)
    with torch.no_grad():
        kept, top_prob, router_logits = router(torch.from_numpy(logits)[None])
        probs = torch.softmax(router_logits, dim=-1)
        aux = hf_switch.load_balancing_loss_func(probs, router_logits.argmax(dim=-1))
    kept = kept[0].numpy().astype(bool)  # [T, E] after capacity
    chosen = np.zeros((T_, E), bool)
    chosen[np.arange(T_), router_logits[0].argmax(dim=-1).numpy()] = True
    gate = np.where(kept, top_prob[0].double().numpy(), 0.0)  # [T, E]
    # HF's slot is its token_priority - 1: the cumulative count over tokens
    combine = combine_from_slots(kept, gate, "token", capacity)
    return Outcome(chosen, kept, gate, combine, float(aux), None)


@pytest.mark.parametrize("case", list(CASES))
def test_switch(case):
    E, cf, dtype = 8, 1.0, np.float32
    logits = CASES[case](T, E, dtype)
    mine = ours("switch", logits, 1, cf)
    theirs = hf_switch_router(logits, mine.capacity)
    if case != "random":
        assert not theirs.kept[theirs.chosen].all()  # the case drops something
    assert_same(mine, theirs, dtype, "switch")


# ---------------------------------------------------------------------------- NLLB-MoE

def nllb_router(E: int, expert_capacity: int | None):
    """NllbMoeTop2Router as configured by default (second expert "all", no batch-prioritised
    routing, gates renormalised after dropping), in training mode. expert_capacity None: fairseq's
    2 ceil(T / E), which the router computes when its expert_capacity is None (HF 5.24's config
    only takes an integer, default 64, so it is set on the router)."""
    cfg = transformers.NllbMoeConfig(
        d_model=E, num_experts=E, expert_capacity=expert_capacity or 64, router_bias=False,
        second_expert_policy="all", normalize_router_prob_before_dropping=False,
        batch_prioritized_routing=False)
    router = hf_nllb.NllbMoeTop2Router(cfg).train()
    router.expert_capacity = expert_capacity
    _identity(router.classifier.weight)
    return router


def hf_nllb_route(logits: np.ndarray, router=None) -> Outcome:
    T_, E = logits.shape
    router = router or nllb_router(E, None)
    x = torch.from_numpy(logits)
    with torch.no_grad():
        _, gates, router_logits = router(x)
        free = nllb_router(E, T_)(x)[1]  # capacity T: nothing drops, the chosen pairs show
        aux = hf_nllb.load_balancing_loss_func((router_logits,), E, top_k=2)
    gate = gates.double().numpy()  # [T, E], renormalised over the kept pairs
    return Outcome(free.numpy() > 0, gate > 0, gate, None, float(aux), router.expert_capacity)


@pytest.mark.parametrize("case", list(CASES))
def test_nllb(case):
    logits = CASES[case](T, 8, np.float32)
    theirs = hf_nllb_route(logits)
    if case == "skewed":
        assert not theirs.kept[theirs.chosen].all()
    if case == "ties":  # the router picks with argmax (lower expert), but NLLB's
        theirs.aux = None  # load_balancing_loss_func re-picks with torch.topk (undocumented ties)
    assert_same(ours("nllb-moe", logits, 2, 1.0), theirs, np.float32, "nllb-moe")


def test_nllb_capacity_is_per_call():
    """Known bug (docs/conventions.md, section 11): HF's NllbMoeTop2Router stores the capacity of
    its first call in self.expert_capacity and keeps it for every later batch; fairseq, and the
    preset, compute 2 ceil(T / E) for each call. Literal case: 48 tokens, then 16, on 8 experts."""
    router = nllb_router(8, None)
    big, small = CASES["skewed"](48, 8, np.float32), CASES["skewed"](16, 8, np.float32)
    assert hf_nllb_route(big, router).capacity == 12 == ours("nllb-moe", big, 2, 1.0).capacity
    assert hf_nllb_route(small, router).capacity == 12  # still the first call's
    assert ours("nllb-moe", small, 2, 1.0).capacity == 4  # 2 ceil(16 / 8)


# ------------------------------------------------------------------------- DeepSeek-V3

def hf_deepseek(logits: np.ndarray, k: int, bias: np.ndarray) -> Outcome:
    """DeepseekV3TopkRouter with the published n_group 8, topk_group 4, norm_topk_prob, scaling
    2.5 and an e_score_correction_bias; it has no load-balancing loss (training only)."""
    T_, E = logits.shape
    cfg = transformers.DeepseekV3Config(hidden_size=E, n_routed_experts=E, num_experts_per_tok=k,
                                        n_group=8, topk_group=4, norm_topk_prob=True,
                                        routed_scaling_factor=2.5)
    router = hf_deepseek_v3.DeepseekV3TopkRouter(cfg)
    _identity(router.weight)
    router.e_score_correction_bias.copy_(torch.from_numpy(bias.astype(np.float32)))
    with torch.no_grad():
        _, weights, index = router(torch.from_numpy(logits))
    chosen, gate = _pairs(T_, E, index, weights)
    return Outcome(chosen, chosen.copy(), gate)


@pytest.mark.parametrize("case", ["random", "skewed"])
@pytest.mark.parametrize("biased", [False, True])
def test_deepseek_v3(case, biased):
    """Sigmoid scores, 8 groups keep 4 (each scored by its 2 best), renormalised, x 2.5, with and
    without a selection bias. No tie case: both the group and the expert choice use torch.topk,
    whose order among equal values is undocumented."""
    E, K = 32, 8
    logits = CASES[case](T, E, np.float32)
    bias = np.random.default_rng(5).normal(0, 0.3, E) if biased else np.zeros(E)
    mine = ours("deepseek-v3", logits, K, None, expert_bias=bias)
    assert_same(mine, hf_deepseek(logits, K, bias), np.float32, "deepseek-v3")


@pytest.mark.parametrize("case", ["random", "skewed"])
def test_nllb_padding_is_counted_not_routed(case):
    """HF NllbMoeTop2Router with a padding_mask (1 = padding; router_ignore_padding_tokens False,
    the default) zeroes padding's choices before the slot cumsum but computes the capacity from
    every row: the `counted` padding mode the nllb-moe preset sets. Kept pairs and gates of the
    real tokens agree; padding keeps nothing."""
    logits = CASES[case](T, 8, np.float32)
    mask = np.random.default_rng(7).random(T) < 0.7  # True = a real token
    router = nllb_router(8, None)
    with torch.no_grad():
        _, gates, _ = router(torch.from_numpy(logits),
                             torch.from_numpy((~mask).astype(np.int64)))
    gate = gates.double().numpy()  # [T, E]
    r = pymoe.route(logits, 2, 1.0, preset="nllb-moe", token_mask=mask)
    assert r.options.padding == "counted" and r.capacity == router.expert_capacity
    ours_gate = np.zeros_like(gate)
    rows = np.repeat(np.arange(T), 2)
    ours_gate[rows, r.expert_index.ravel()] = r.gate.ravel()
    np.testing.assert_array_equal(ours_gate > 0, gate > 0)
    np.testing.assert_allclose(ours_gate, gate, rtol=1e-6, atol=1e-7)
    assert not gate[~mask].any()
