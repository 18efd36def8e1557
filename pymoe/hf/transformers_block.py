"""from_transformers: a live HF transformers block (a torch module) -> MoELayer."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..layer import MoELayer
from .convert import build, family_of
from .families import BLOCKS


def _find_block(module: Any) -> Any:
    """The module itself when its class is a known MoE block, else its first descendant that is
    (a decoder layer holding an MoE block)."""
    if type(module).__name__ in BLOCKS:
        return module
    for _, sub in module.named_modules():
        if type(sub).__name__ in BLOCKS:
            return sub
    raise ValueError(f"block: {type(module).__name__} is not, and holds no, MoE block pymoe.hf "
                     "knows; pymoe.hf.families() lists the supported families and their blocks")


def _config_dict(config: Any, block: Any) -> dict[str, Any]:
    if config is None:  # most blocks keep the config on themselves or a submodule
        config = next((m.config for _, m in block.named_modules()
                       if getattr(m, "config", None) is not None), None)
        if config is None:
            raise ValueError(f"config: {type(block).__name__} keeps no config; pass the model's "
                             "config (model.config)")
    if hasattr(config, "get_text_config"):  # multimodal models: the MoE is in the text model
        config = config.get_text_config()
    fields = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return fields


def _layer_index(module: Any) -> int | None:
    for _, sub in module.named_modules():
        idx = getattr(sub, "layer_idx", None)
        if isinstance(idx, int):
            return idx
    return None


def from_transformers(block: Any, config: Any = None) -> MoELayer:
    """The MoELayer that computes what an HF transformers MoE block computes.

    Args:
        block: the module computing one layer's MoE output (router + routed experts + shared
            experts), e.g. `model.model.layers[1].mlp`; or the decoder layer that holds it (for
            the families whose MoE branch lives in the layer, the layer's MoE branch is
            reproduced, not its attention or dense MLP).
        config: the model config (model.config), or None to use the one the block keeps.
    Returns:
        a MoELayer whose forward(x) on a NumPy `[T, D]` array equals the block's output for
        `hidden_states = x[None]`, whose routing.expert_index holds the experts the HF router
        chose, and whose backward(dy) is torch's dx; no torch object is kept (layer.hf records
        the family, the config dict and the HF tensor shapes for state_dict/grad_dict).
        Its aux_loss_coef and z_loss_coef are 0 (the block's gradient; the model-level loss is
        pymoe.hf.load_balancing_loss).
    """
    moe = _find_block(block)
    family = family_of(type(moe).__name__)
    fields = _config_dict(config, block)
    state = {}
    dtypes = set()
    for key, tensor in moe.state_dict().items():
        t = tensor.detach().cpu()
        if t.is_floating_point():
            dtypes.add(str(t.dtype))
            if t.dtype not in (_torch().float32, _torch().float64):
                t = t.float()  # bfloat16 / float16 blocks compute in float32 here
        state[key] = t.numpy().copy()
    # a float64 block whose router keeps float32 weights (Switch, NLLB cast the classifier to
    # router_dtype on every forward) is a float64 model
    dtype = np.float64 if "torch.float64" in dtypes else np.float32
    return build(family, fields, state, _layer_index(block), dtype)


def _torch() -> Any:
    import torch
    return torch
