"""Softmax top-K families (the survey's convention C1): p = softmax(router logits) over E, the
top K of p, gates raw or renormalised over the K (the same as a softmax over the top-K logits)."""
from __future__ import annotations

from ._base import Config, Family, Spec, standard


def _mixtral(cfg: Config, layer, shapes) -> Spec:
    return standard(cfg, shapes, preset="mixtral")


def _qwen2_moe(cfg: Config, layer, shapes) -> Spec:
    return standard(cfg, shapes, preset="qwen2-moe", shared="shared_expert",
                    shared_gate="shared_expert_gate.weight",
                    normalize=bool(cfg.get("norm_topk_prob")))


def _qwen3_moe(cfg: Config, layer, shapes) -> Spec:
    return standard(cfg, shapes, preset="qwen3-moe", normalize=bool(cfg.get("norm_topk_prob")))


def _olmoe(cfg: Config, layer, shapes) -> Spec:
    return standard(cfg, shapes, preset="olmoe", normalize=bool(cfg.get("norm_topk_prob")))


FAMILIES = [
    Family("mixtral", ("MixtralSparseMoeBlock",), "mixtral", "swiglu", _mixtral,
           disk_blocks=("block_sparse_moe", "mlp")),
    Family("qwen2_moe", ("Qwen2MoeSparseMoeBlock",), "qwen2-moe", "swiglu", _qwen2_moe),
    Family("qwen3_moe", ("Qwen3MoeSparseMoeBlock",), "qwen3-moe", "swiglu", _qwen3_moe),
    Family("olmoe", ("OlmoeSparseMoeBlock",), "olmoe", "swiglu", _olmoe),
]
