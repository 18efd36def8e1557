"""Tiny-model config keywords (beyond tiny.GENERIC) for the families in
pymoe/hf/families/gemma_kolibri.py."""

_GEMMA = {"enable_moe_block": True, "top_k_experts": 2, "num_experts": 8,
          "hidden_activation": "gelu_pytorch_tanh"}

EXTRA: dict[str, dict] = {
    "kolibri1": {"norm_topk_prob": True},
    "gemma4": {**_GEMMA, "hidden_size_per_layer_input": 0},
    "diffusion_gemma": {**_GEMMA},
}

MODELS: dict[str, str] = {"diffusion_gemma": "DiffusionGemmaEncoderTextModel"}


def _gemma_branch(layer, x):
    """The MoE branch of a Gemma 4 decoder layer for the residual x `[1, T, D]`, called
    module by module as the layer's forward does (its dense MLP beside it left out)."""
    flat = x.reshape(-1, x.shape[-1])
    _, weights, index = layer.router(flat)
    h = layer.experts(layer.pre_feedforward_layernorm_2(flat), index, weights)
    return layer.post_feedforward_layernorm_2(h.reshape(x.shape))


BRANCHES = {"gemma4": _gemma_branch, "diffusion_gemma": _gemma_branch}
