"""Tiny random HF transformers models, one per family, and the comparison of one of their MoE
blocks with the pymoe layer pymoe.hf makes of it.

Every family is built from its own config class with small sizes (D = 32, E = 8, K = 2 where
the family allows, two layers), its first sparse layer's block is given random weights
(router N(0, 1): routing far from uniform; a selection bias N(0, 0.3) where the family has one;
experts N(0, 1/fan_in)) and run on random tokens, forward and backward, in float64 and float32.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from helpers import import_optional

torch = import_optional("torch", "crosscheck")
transformers = import_optional("transformers", "crosscheck")

import importlib  # noqa: E402

import pymoe.hf  # noqa: E402
from pymoe.hf.families import GROUPS  # noqa: E402
from pymoe.hf.transformers_block import _find_block  # noqa: E402

GENERIC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=128, intermediate_size=64, moe_intermediate_size=32,
               shared_expert_intermediate_size=48, num_experts=8, num_local_experts=8,
               n_routed_experts=8, moe_num_experts=8, num_experts_per_tok=2, moe_k=2, top_k=2,
               first_k_dense_replace=0, head_dim=8, pad_token_id=0)
# one tests/hf/configs_<group>.py per family module pymoe/hf/families/<group>.py
_CONFIGS = [importlib.import_module(f"configs_{g}") for g in GROUPS]


def _merged(name: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in _CONFIGS:
        out.update(getattr(m, name, {}))
    return out


# family -> config keywords beyond GENERIC (EXTRA of its configs module)
EXTRA: dict[str, dict[str, Any]] = _merged("EXTRA")
# family -> the transformers model class to build when AutoModel has none for its text config
MODELS: dict[str, str] = _merged("MODELS")
# family -> the model_type its tiny config is made from, where the family's name (the
# transformers directory) is not one (inkling's text config is "inkling_text")
MODEL_TYPES: dict[str, str] = _merged("MODEL_TYPES")
# family -> fn(block, xt) -> (y, chosen [T, K] or None): the reference compare() checks pymoe
# against instead of calling the block (NLLB: HF's experts forward runs the wrong experts)
REFERENCE: dict[str, Any] = _merged("REFERENCE")
# family -> (block, x) -> the block's MoE output, where calling the block is not that (a decoder
# layer holding the MoE branch)
BRANCHES: dict[str, Any] = _merged("BRANCHES")
# family -> fn(block, T, rng) -> (the block's extra forward keywords, MoELayer.forward's): inputs
# besides x (DeepSeek-V4's hash layers: input_ids / token_ids); it may fill integer buffers
INPUTS: dict[str, Any] = _merged("INPUTS")
TOL = {np.float64: (1e-10, 1e-8), np.float32: (2e-5, 2e-5)}  # (forward, gradients), relative
# family -> {dtype name: (forward, gradients)}: a family's own stated tolerance (its reason is
# written where it is set, in tests/hf/configs_<group>.py TOL)
FAMILY_TOL: dict[str, dict[str, tuple[float, float]]] = _merged("TOL")
# family -> {dtype name: reason}: HF's block itself fails in that dtype (test_blocks xfails it)
XFAIL: dict[str, dict[str, str]] = _merged("XFAIL")


def tolerances(family: str, dtype) -> tuple[float, float]:
    """HF routers that compute in float32 in a float64 model hold float64 to float32's."""
    own = FAMILY_TOL.get(family, {}).get(np.dtype(dtype).name)
    if own is not None:
        return own
    if dtype == np.float64 and pymoe.hf.families()[family]["router_dtype"] == "float32":
        return TOL[np.float32]
    return TOL[dtype]


def tiny_config(family: str, **overrides: Any):
    kw = {**GENERIC, **EXTRA.get(family, {}), **overrides}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = transformers.AutoConfig.for_model(MODEL_TYPES.get(family, family), **kw)
        text = cfg.get_text_config()
        if text is not cfg:
            cfg = type(text)(**kw)
    return cfg


def tiny_model(family: str, seed: int = 0, **overrides: Any):
    """(model, config) of a tiny random model of the family, in eval mode, with the eager
    experts implementation (grouped_mm, the default, takes no float64)."""
    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if family in MODELS:
            model = getattr(transformers, MODELS[family])._from_config(
                cfg, experts_implementation="eager")
        else:
            try:
                model = transformers.AutoModel.from_config(cfg, experts_implementation="eager")
            except ValueError:  # a multimodal model's text config: its <Prefix>TextModel
                model = _text_model(cfg)._from_config(cfg, experts_implementation="eager")
    return model.eval(), cfg


def _text_model(cfg):
    import importlib
    module = importlib.import_module(type(cfg).__module__.replace(".configuration_", ".modeling_"))
    return getattr(module, type(cfg).__name__.replace("Config", "Model"))


def randomize(block, seed: int = 0) -> None:
    """Random weights for every floating parameter and buffer of the block."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(block.named_parameters()) + list(block.named_buffers()):
            if not t.is_floating_point():
                continue
            if "bias" in name and t.ndim <= 2 and ("correction" in name or "expert_bias" in name):
                std = 0.3
            elif t.ndim == 1:
                std = 0.5
            elif name.endswith(("gate.weight", "router.weight", "classifier.weight")):
                std = 1.0
            else:
                std = t.shape[-1] ** -0.5
            t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) * std)


@dataclass
class Comparison:
    """Relative differences (max |ours - theirs| / max |theirs|) of one block's check."""
    y: float
    dx: float
    grads: dict[str, float]
    chosen_differ: int  # tokens whose set of chosen experts differs
    state_exact: bool


def rel(ours: np.ndarray, theirs: np.ndarray) -> float:
    scale = float(np.max(np.abs(theirs))) or 1.0
    return float(np.max(np.abs(np.asarray(ours, np.float64) - theirs))) / scale


def chosen_by_hf(block, run) -> np.ndarray | None:
    """The [T, K] expert indices the block's router returned during run(), or None when it
    returns none (read from a forward hook on the router)."""
    found: list[np.ndarray] = []
    router = next((m for n, m in block.named_modules()
                   if n.split(".")[-1] in ("gate", "router") and n.count(".") <= 1), None)
    if router is None:
        return run() and None
    def hook(_m, _inp, out):
        outs = out if isinstance(out, tuple) else (out,)
        for o in outs:
            if isinstance(o, torch.Tensor) and not o.is_floating_point() and o.ndim == 2:
                found.append(o.detach().numpy())
    handle = router.register_forward_hook(hook)
    try:
        run()
    finally:
        handle.remove()
    return found[0] if found else None


def compare(family: str, dtype=np.float64, T: int = 64, seed: int = 0, **overrides: Any) -> Comparison:
    model, cfg = tiny_model(family, seed, **overrides)
    block = _find_block(model)
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    block = block.to(tdt)
    randomize(block, seed)
    rng = np.random.default_rng(seed)
    D = cfg.hidden_size
    x = rng.standard_normal((T, D)).astype(dtype)
    dy = rng.standard_normal((T, D)).astype(dtype)
    xt = torch.from_numpy(x.copy())[None].requires_grad_(True)
    hf_kw, my_kw = INPUTS[family](block, T, np.random.default_rng([seed, 7])) \
        if family in INPUTS else ({}, {})
    out: list[Any] = []
    def run():
        o = BRANCHES[family](block, xt) if family in BRANCHES else block(xt, **hf_kw)
        out.append(o[0] if isinstance(o, tuple) else o)
    if family in REFERENCE:
        y_ref, chosen = REFERENCE[family](block, xt)
        out.append(y_ref)
    else:
        chosen = chosen_by_hf(block, run)
    y_hf = out[0]
    (y_hf * torch.from_numpy(dy)[None]).sum().backward()
    layer = pymoe.hf.from_transformers(block, cfg)
    y = layer.forward(x, **my_kw)
    dx = layer.backward(dy)
    grads_hf = {k: p.grad.detach().numpy() for k, p in block.named_parameters()
                if p.grad is not None}
    ours = pymoe.hf.grad_dict(layer)
    # a tensor HF never used has no .grad (ernie4_5_vl_moe's vision experts on text tokens):
    # pymoe's gradient there must be exactly 0
    assert set(grads_hf) <= set(ours), (sorted(ours), sorted(grads_hf))
    assert all(not np.any(ours[k]) for k in set(ours) - set(grads_hf)), \
        sorted(set(ours) - set(grads_hf))
    differ = 0
    if chosen is not None:
        mine = np.sort(layer.routing.expert_index, axis=1)
        differ = int(np.any(mine != np.sort(chosen, axis=1), axis=1).sum())
    sd = pymoe.hf.state_dict(layer)
    ignored = set(pymoe.hf.convert._spec(layer)[1].ignored)  # HF tensors the block never uses
    ref = {k: v.detach().numpy() for k, v in block.state_dict().items() if k not in ignored}
    exact = list(sd) == list(ref) and all(np.array_equal(sd[k], ref[k]) for k in ref)
    # [1, T, D], or [T, D] where the block returns its output flattened (Llama 4)
    return Comparison(rel(y, y_hf.detach().numpy().reshape(T, D)), rel(dx, xt.grad.numpy()[0]),
                      {k: rel(ours[k], grads_hf[k]) for k in grads_hf}, differ, exact)
