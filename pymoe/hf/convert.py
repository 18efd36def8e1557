"""A HF transformers MoE block <-> a pymoe MoELayer: the family table's entries applied.

from_transformers reads a block's state dict and config into a MoELayer; state_dict and
grad_dict give the layer's parameters and gradients back under the block's own keys. Nothing of
torch is kept: the layer records where it came from in `layer.hf` (plain data, pickles).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..layer import MoELayer
from .families import BLOCKS, FAMILIES, Config, Family, Spec


@dataclass(frozen=True)
class Origin:
    """Where a layer came from: the family, its config (a plain dict), the decoder layer index
    (None when unknown) and each HF tensor's shape, in the block's state-dict order."""
    family: str
    config: dict[str, Any]
    layer: int | None
    shapes: dict[str, tuple[int, ...]]


def family_of(name: str) -> Family:
    """The table entry for a model_type (`mixtral`) or a block class name."""
    if name in FAMILIES:
        return FAMILIES[name]
    if name in BLOCKS:
        return FAMILIES[BLOCKS[name]]
    raise ValueError(f"family: no pymoe.hf entry for {name!r}; pymoe.hf.families() lists the "
                     "supported ones")


def build(family: Family, config: Mapping[str, Any], state: Mapping[str, np.ndarray],
          layer: int | None, dtype: Any) -> MoELayer:
    """The MoELayer of one block, from its (in-memory HF) state dict as NumPy arrays."""
    shapes = {k: tuple(np.shape(v)) for k, v in state.items()}
    spec = family.spec(Config(config, family.name), layer, shapes)
    unused = set(state) - {k for t in spec.tensors for k in t.keys} - set(spec.ignored)
    if unused:
        raise ValueError(f"block: {family.name} tensors {sorted(unused)} have no place in the "
                         "pymoe layer; pymoe.hf would drop them silently, so it refuses")
    missing = [k for t in spec.tensors for k in t.keys if k not in state]
    if missing:
        raise ValueError(f"block: {family.name} needs tensors {missing}, which the state dict "
                         "does not have")
    keywords = dict(spec.keywords)
    if spec.jitter_experts_dtypes is not None and keywords.get("jitter_eps", 0.0) > 0:
        keywords["jitter_experts"] = np.dtype(dtype).name in spec.jitter_experts_dtypes
    out = MoELayer(*spec.sizes, dtype=dtype, **keywords)
    for t in spec.tensors:
        value = np.asarray(t.to_pymoe(*(np.asarray(state[k]) for k in t.keys)))
        if t.param == "expert_bias":
            out.expert_bias = value.astype(np.float64)
            continue
        if t.param == "hash_table":  # deepseek_v4's tid2eid: a frozen int buffer
            out.hash_table = out._checked_hash_table(value)
            continue
        want = out.params[t.param].shape
        if value.shape != want:
            raise ValueError(f"block: {family.name} tensor(s) {list(t.keys)} give "
                             f"params['{t.param}'] the shape {value.shape}, the layer needs {want}")
        out.params[t.param] = np.ascontiguousarray(value, dtype=out.dtype)
    out.hf = Origin(family.name, dict(config), layer, shapes)
    return out


def _spec(layer: MoELayer) -> tuple[Origin, Spec]:
    origin = getattr(layer, "hf", None)
    if not isinstance(origin, Origin):
        raise ValueError("layer: not made by pymoe.hf (from_transformers or load), so it has no "
                         "HF keys to give back")
    return origin, FAMILIES[origin.family].spec(Config(origin.config, origin.family),
                                                origin.layer, origin.shapes)


def _to_hf(layer: MoELayer, values: Mapping[str, np.ndarray], grads: bool) -> dict[str, np.ndarray]:
    origin, spec = _spec(layer)
    covered = {t.param for t in spec.tensors}
    if not grads:  # a parameter HF has no tensor for must still be 0, or the round trip loses it
        for name, p in layer.params.items():
            if name not in covered and np.any(p != 0):
                raise ValueError(f"layer: params['{name}'] is not zero, but {origin.family} has "
                                 "no tensor for it: the HF block cannot hold this layer")
    out: dict[str, np.ndarray] = {}
    for t in spec.tensors:
        if grads and (t.buffer or t.param == "expert_bias"):
            continue
        if t.param == "expert_bias":
            if layer.expert_bias is None:
                raise ValueError(f"layer: {origin.family} has a selection bias "
                                 f"({t.keys[0]}), but layer.expert_bias is None")
            value = np.asarray(layer.expert_bias, dtype=layer.dtype)
        elif t.param == "hash_table":
            if layer.hash_table is None:
                raise ValueError(f"layer: {origin.family} has a hash table ({t.keys[0]}), but "
                                 "layer.hash_table is None")
            value = np.asarray(layer.hash_table, dtype=np.int64)
        else:
            value = values[t.param]
        for key, a in zip(t.keys, t.to_hf(value)):
            out[key] = np.ascontiguousarray(a).reshape(origin.shapes[key])
    order = list(origin.shapes)
    return {k: out[k] for k in order if k in out}


def state_dict(layer: MoELayer) -> dict[str, np.ndarray]:
    """The block's own state-dict keys (relative to the block) with the layer's values, in the
    block's order: loading it into the HF block (`load_state_dict`) gives the layer's block."""
    return _to_hf(layer, layer.params, grads=False)


def grad_dict(layer: MoELayer) -> dict[str, np.ndarray]:
    """After layer.backward(dy): each trainable HF parameter's gradient under its state-dict key
    (what torch leaves in `.grad` for the same dy); buffers (the selection bias) are left out."""
    return _to_hf(layer, layer.grads, grads=True)
