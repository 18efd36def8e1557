"""08: a real model's MoE layer in pymoe: HF transformers blocks loaded, checked and pictured.

What it teaches: a model's MoE layer is a router, gated (SwiGLU) experts and shared experts,
each one step of pymoe's recipe. For a tiny random Mixtral, DeepSeek-V3 and Qwen3-MoE layer
built by transformers, pymoe.hf.from_transformers makes the pymoe MoELayer; the script runs HF's
block and pymoe's layer on the same tokens, forward and backward, and prints how far apart the
outputs, the chosen experts, dx and every parameter gradient are (float64: HF computes these
routers in float32, so float32 round-off is the floor), then the same layer loaded without torch
from a bfloat16 checkpoint written by save_pretrained. Pictures: each layer's routing.

With --checkpoint DIR --layer N it does the same for your own checkpoint (a save_pretrained
directory, e.g. one downloaded from the Hub): pymoe.hf.load reads layer N's MoE block (no torch
needed); when torch and transformers are installed, the HF block is built from the config with
those weights and compared on random tokens.

Run:  python examples/08_hf_block.py [--quick] [--out DIR]
      python examples/08_hf_block.py --checkpoint DIR --layer N [--tokens T]
Needs: torch and transformers (the crosscheck extra) for the tiny models and the comparison.
"""
from __future__ import annotations

import argparse
import importlib
import os
import tempfile
import warnings
from typing import Any

import numpy as np

import pymoe.hf
from pymoe import viz

# family -> (what it is, config keywords of the tiny model)
TINY = {
    "mixtral": ("Mixtral: softmax top-2, renormalised; SwiGLU experts", {}),
    "deepseek_v3": ("DeepSeek-V3: sigmoid + selection bias, 4 groups keep 2, x2.5; a shared "
                    "expert", {"n_group": 4, "topk_group": 2}),
    "qwen3_moe": ("Qwen3-MoE: softmax top-2, renormalised", {"norm_topk_prob": True}),
}
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, intermediate_size=64, moe_intermediate_size=32, num_experts=8,
             num_local_experts=8, n_routed_experts=8, num_experts_per_tok=2, head_dim=8,
             first_k_dense_replace=0, pad_token_id=0)


def _torch() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError:
        return None, None
    return torch, transformers


def randomize(block: Any, seed: int) -> None:
    """Weights far from initialisation: router N(0, 1) (routing well away from uniform),
    selection bias N(0, 0.3), experts N(0, 1/fan_in)."""
    torch, _ = _torch()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(block.named_parameters()) + list(block.named_buffers()):
            if t.is_floating_point():
                std = (0.3 if "bias" in name else 1.0 if name.startswith("gate.")
                       else t.shape[-1] ** -0.5)
                t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) * std)


def rel(ours: np.ndarray, theirs: np.ndarray) -> float:
    """max |ours - theirs| / max |theirs|."""
    return float(np.max(np.abs(ours - theirs)) / max(float(np.max(np.abs(theirs))), 1e-300))


def side_by_side(block: Any, layer: pymoe.MoELayer, x: np.ndarray, seed: int) -> dict[str, Any]:
    """HF's block and pymoe's layer on the same tokens: forward, chosen experts, backward."""
    torch, _ = _torch()
    block.zero_grad(set_to_none=True)  # .grad accumulates, and survives .to(dtype)
    dy = np.random.default_rng(seed + 1).standard_normal(x.shape).astype(x.dtype)
    chosen: list[np.ndarray] = []
    router = getattr(block, "gate", None) or getattr(block, "router", None)
    hook = router.register_forward_hook(lambda m, i, o: chosen.extend(
        t.numpy() for t in (o if isinstance(o, tuple) else (o,))
        if isinstance(t, torch.Tensor) and not t.is_floating_point()))
    xt = torch.from_numpy(x.copy())[None].requires_grad_(True)
    y_hf = block(xt)
    y_hf = y_hf[0] if isinstance(y_hf, tuple) else y_hf
    hook.remove()
    (y_hf * torch.from_numpy(dy)[None]).sum().backward()
    y = layer.forward(x)
    dx = layer.backward(dy)
    grads = pymoe.hf.grad_dict(layer)
    theirs = {k: p.grad.numpy() for k, p in block.named_parameters() if p.grad is not None}
    same_sets = np.all(np.sort(layer.routing.expert_index, 1) == np.sort(chosen[0], 1), axis=1)
    return {"y": rel(y, y_hf.detach().numpy()[0]), "dx": rel(dx, xt.grad.numpy()[0]),
            "grads": max(rel(grads[k], theirs[k]) for k in theirs),
            "chosen_same": int(same_sets.sum()), "T": x.shape[0]}


def tiny_block(family: str, seed: int = 0) -> tuple[Any, Any, Any]:
    """(model, its config, layer 1's MoE block) of a tiny random model, float64, eval mode."""
    torch, transformers = _torch()
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = transformers.AutoConfig.for_model(family, **SIZES, **TINY[family][1])
        model = transformers.AutoModel.from_config(cfg, experts_implementation="eager")
    model = model.double().eval()
    block = model.layers[1].mlp
    randomize(block, seed)
    return model, cfg, block


def print_row(name: str, res: dict[str, Any]) -> None:
    print(f"  {name:28s} y {res['y']:.1e}   dx {res['dx']:.1e}   every gradient "
          f"{res['grads']:.1e}   same experts {res['chosen_same']}/{res['T']} tokens")


def show_layer(family: str, layer: pymoe.MoELayer) -> None:
    f = pymoe.hf.families()[family]
    print(f"  pymoe layer: preset {f['preset']!r}, experts {layer.activation!r}, "
          f"E={layer.num_experts}, K={layer.k}, D={layer.d_model}, H={layer.d_hidden}, "
          f"shared experts {layer.num_shared_experts}, router computed by HF in "
          f"{f['router_dtype']}")


def tiny_models(args: argparse.Namespace) -> dict[str, Any]:
    torch, _ = _torch()
    results: dict[str, Any] = {}
    routings = {}
    for family, (what, _) in TINY.items():
        print(f"\n== {what}")
        model, cfg, block = tiny_block(family)
        layer = pymoe.hf.from_transformers(block)
        show_layer(family, layer)
        x = np.random.default_rng(0).standard_normal((args.tokens, cfg.hidden_size))
        res = side_by_side(block, layer, x, 0)
        print_row("from_transformers, float64", res)
        sd = pymoe.hf.state_dict(layer)
        ref = block.state_dict()
        exact = all(np.array_equal(sd[k], ref[k].numpy()) for k in ref) and list(sd) == list(ref)
        print(f"  state_dict round trip: {len(sd)} tensors, "
              f"{'bit for bit' if exact else 'DIFFERENT'}")
        # the same layer from a bfloat16 checkpoint, read with NumPy alone
        with tempfile.TemporaryDirectory() as d:
            model.to(torch.bfloat16).save_pretrained(d)
            loaded = pymoe.hf.load(d, layer=1)
        block32 = model.layers[1].mlp.float()
        x32 = x.astype(np.float32)
        res32 = side_by_side(block32, loaded, x32, 0)
        print_row("load(bfloat16 checkpoint)", res32)
        print("    (against HF's block with the same bfloat16 weights, computed in float32)")
        results[family] = {"from_transformers": res, "state_exact": exact, "load_bf16": res32}
        routings[family] = layer.routing
    results["pictures"] = pictures(routings, args.out)
    return results


def pictures(routings: dict[str, Any], out: str) -> dict[str, Any]:
    os.makedirs(out, exist_ok=True)
    figs = {}
    for family, r in routings.items():
        path = os.path.join(out, f"08_{family}_routing.png")
        figs[path] = viz.routing_heatmap(r, path, title=f"{family}: routing of {r.probs.shape[0]} "
                                         f"tokens to {r.probs.shape[1]} experts, K={r.k}",
                                         max_tokens=32)
    path = os.path.join(out, "08_expert_load.png")
    figs[path] = viz.expert_load_bars(routings, path)
    print("\npictures: " + ", ".join(figs))
    return figs


def hf_block_for(layer: pymoe.MoELayer) -> Any:
    """The HF block class of the layer's family, built from its config with the layer's own
    weights (pymoe.hf.state_dict), in float32."""
    torch, transformers = _torch()
    family = pymoe.hf.families()[layer.hf.family]
    cls_name = family["blocks"].split(", ")[0]
    module = importlib.import_module(f"transformers.models.{layer.hf.family}."
                                     f"modeling_{layer.hf.family}")
    cfg = transformers.AutoConfig.for_model(**layer.hf.config)
    cfg._experts_implementation = "eager"
    block = getattr(module, cls_name)(cfg.get_text_config())
    block.load_state_dict({k: torch.from_numpy(v) for k, v in pymoe.hf.state_dict(layer).items()})
    return block.to(torch.float32 if layer.dtype == np.float32 else torch.float64).eval()


def checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    layer = pymoe.hf.load(args.checkpoint, args.layer)
    family = layer.hf.family
    print(f"== {args.checkpoint}, decoder layer {args.layer}: {family}")
    show_layer(family, layer)
    x = np.random.default_rng(0).standard_normal((args.tokens, layer.d_model)).astype(layer.dtype)
    layer.forward(x)
    r = layer.routing
    load = np.bincount(r.expert_index.ravel(), minlength=layer.num_experts)
    print(f"  {args.tokens} random tokens: busiest expert {load.max()} choices, idlest "
          f"{load.min()} (balanced: {args.tokens * layer.k / layer.num_experts:.1f})")
    results: dict[str, Any] = {"layer": layer}
    torch, _ = _torch()
    if torch is None:
        print("  (torch + transformers not installed: no comparison with HF's block)")
    else:
        res = side_by_side(hf_block_for(layer), layer, x, 0)
        print_row("against HF's block", res)
        results["compare"] = res
    results["pictures"] = pictures({family: r}, args.out)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="a save_pretrained directory (config.json + safetensors)")
    ap.add_argument("--layer", type=int, default=1, help="decoder layer index (default 1)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens to route (default 64)")
    ap.add_argument("--quick", action="store_true", help="32 tokens")
    ap.add_argument("--out", default="pymoe-out", help="where the pictures go (default pymoe-out)")
    args = ap.parse_args(argv)
    if args.tokens is None:
        args.tokens = 32 if args.quick else 64
    if args.tokens < 1:
        ap.error(f"--tokens: expected >= 1, got {args.tokens}")
    if args.checkpoint:
        return checkpoint(args)
    if _torch()[0] is None:
        ap.exit(1, "08_hf_block.py builds its tiny models with torch and transformers: "
                   "pip install -e \".[crosscheck]\" (or pass --checkpoint DIR)\n")
    return tiny_models(args)


if __name__ == "__main__":
    main()
