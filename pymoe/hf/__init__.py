"""pymoe.hf: a real model's MoE layer in pymoe, from HF transformers modules or checkpoints.

    layer = pymoe.hf.from_transformers(model.model.layers[1].mlp)   # live torch module
    layer = pymoe.hf.load("path/to/checkpoint", layer=1)            # no torch needed
    y = layer.forward(x)                      # the block's output for hidden_states = x[None]
    pymoe.hf.state_dict(layer)                # the block's own keys and values back
    pymoe.hf.grad_dict(layer)                 # after backward: torch's .grad under those keys

families() lists every supported family with its preset and expert form; docs/hf.md the table
and how each is checked against HF's own code.
"""
from __future__ import annotations

from .checkpoint import load
from .convert import Origin, grad_dict, state_dict
from .families import FAMILIES
from .loss import load_balancing_loss
from .transformers_block import from_transformers


def families() -> dict[str, dict[str, str]]:
    """Every supported family (HF model_type) -> {preset, form, blocks, router_dtype, note}."""
    return {name: {"preset": f.preset, "form": f.form, "blocks": ", ".join(f.blocks),
                   "router_dtype": f.router_dtype, "note": f.note}
            for name, f in sorted(FAMILIES.items())}


__all__ = ["Origin", "families", "from_transformers", "grad_dict", "load", "load_balancing_loss",
           "state_dict"]
