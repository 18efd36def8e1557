"""load(path, layer): one decoder layer's MoE block from a checkpoint directory, without torch.

A directory as save_pretrained writes it: config.json and model.safetensors, or shards listed in
model.safetensors.index.json. Only the chosen layer's tensors are read. save_pretrained writes
the original per-expert names (`mlp.experts.3.gate_proj.weight`, Mixtral's
`block_sparse_moe.experts.3.w1.weight`), which transformers fuses into `experts.gate_up_proj`
`[E, 2H, D]` and `experts.down_proj` `[E, D, H]` when it loads (its conversion_mapping.py);
the same fusion is done here, so both spellings load.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from ..layer import MoELayer
from .convert import build, family_of
from .families import FAMILIES
from .safetensors import SafetensorsFile

# per-expert names on disk -> (fused in-memory tensor, part): gate rows first, then up
_PER_EXPERT = re.compile(r"^(?P<experts>.*experts)\.(?P<i>\d+)\.(?P<name>gate_proj|up_proj|"
                         r"down_proj|w1|w3|w2)\.weight$")
_PART = {"gate_proj": ("gate_up_proj", 0), "w1": ("gate_up_proj", 0),
         "up_proj": ("gate_up_proj", 1), "w3": ("gate_up_proj", 1),
         "down_proj": ("down_proj", 0), "w2": ("down_proj", 0)}


def _files(path: str) -> dict[str, SafetensorsFile]:
    """tensor name -> the file holding it."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as fh:
            weight_map = json.load(fh)["weight_map"]
        opened: dict[str, SafetensorsFile] = {}
        for name in set(weight_map.values()):
            opened[name] = SafetensorsFile(os.path.join(path, name))
        return {k: opened[v] for k, v in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise ValueError(f"path: {path} has neither model.safetensors nor "
                         "model.safetensors.index.json")
    one = SafetensorsFile(single)
    return {k: one for k in one.names()}


def _layer_prefixes(names: list[str], layer: int) -> list[str]:
    """Every 'x.layers.N.y.' (or DBRX's 'blocks.N.') prefix of the chosen layer's MoE tensors."""
    pat = re.compile(rf"^(.*?(?:layers|blocks|block)\.{layer}\.[^.]+\.)")
    found = {m.group(1) for n in names if (m := pat.match(n))}
    return sorted(found)


def _fuse(disk: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-expert tensors -> transformers' fused in-memory ones; every other name kept."""
    out: dict[str, np.ndarray] = {}
    parts: dict[tuple[str, str], dict[int, list[Any]]] = {}
    for name, a in disk.items():
        m = _PER_EXPERT.match(name)
        if m is None:
            out[name] = a
            continue
        fused, half = _PART[m["name"]]
        slot = parts.setdefault((m["experts"], fused), {}).setdefault(int(m["i"]), [None, None])
        slot[half] = a
    for (experts, fused), by_expert in parts.items():
        E = max(by_expert) + 1
        if sorted(by_expert) != list(range(E)):
            raise ValueError(f"checkpoint: {experts} has experts {sorted(by_expert)}: not 0..E-1")
        if fused == "gate_up_proj" and all(g is None for g, _ in by_expert.values()):
            fused = "up_proj"  # non-gated experts (nemotron_h): up_proj alone, stacked as is
        rows = []
        for i in range(E):
            pieces = [p for p in by_expert[i] if p is not None]
            if fused == "gate_up_proj" and len(pieces) != 2:
                raise ValueError(f"checkpoint: {experts}.{i} lacks its gate or up projection")
            rows.append(np.concatenate(pieces, axis=0))
        out[f"{experts}.{fused}"] = np.stack(rows)
    return out


def read_config(path: str) -> dict[str, Any]:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path) or not os.path.exists(cfg_path):
        raise ValueError(f"path: expected a checkpoint directory with config.json, got {path!r}")
    with open(cfg_path) as f:
        return json.load(f)


def load(path: str | os.PathLike, layer: int) -> MoELayer:
    """The MoELayer of decoder layer `layer` of the checkpoint at `path`.

    float32, float16 and bfloat16 checkpoints load as float32 layers (bfloat16 widened exactly,
    without torch), float64 ones as float64. Equal to pymoe.hf.from_transformers on the same
    block of the model transformers loads from `path`.
    """
    path = os.fspath(path)
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise TypeError(f"layer: expected a decoder layer index >= 0, got {layer!r}")
    config = read_config(path)
    model_type = str(config.get("model_type"))
    if model_type.endswith("_text") and model_type not in FAMILIES:
        model_type = model_type[:-len("_text")]  # a multimodal family's text model saved alone
    family = family_of(model_type)
    fields = config.get("text_config") or config
    if fields is not config:  # multimodal: the text model's fields, with the top-level type
        fields = {**fields, "model_type": config.get("model_type")}
    files = _files(path)
    prefixes = [p for p in _layer_prefixes(list(files), layer)
                if p.rstrip(".").rsplit(".", 1)[-1] in family.disk_blocks]
    if not prefixes:
        raise ValueError(f"layer: the checkpoint has no MoE block at layer {layer} (a dense "
                         "layer, or out of range)")
    prefix = prefixes[0]
    names = [k for k in files if k.startswith(prefix)]
    if family.disk_layer:  # keys relative to the decoder layer, from each of its MoE modules
        names = [k for k in files if any(k.startswith(p) for p in prefixes)]
        prefix = prefix[:prefix.rstrip(".").rfind(".") + 1]
    disk = {k[len(prefix):]: files[k].read(k) for k in names}
    # disk_renames keys '../name': a tensor of the block kept beside it, in the decoder layer
    # (axk1 saves mlp.post_mlp_layernorm as the layer's post_mlp_layernorm)
    outer = prefix[:prefix.rstrip(".").rfind(".") + 1]
    for src in family.disk_renames:
        if src.startswith("../") and outer + src[3:] in files:
            names.append(outer + src[3:])
            disk[src] = files[outer + src[3:]].read(outer + src[3:])
    codes = {files[k].dtype(k) for k in names}
    state = {family.disk_renames.get(k, k): v for k, v in _fuse(disk).items()}
    dtype = np.float64 if codes == {"F64"} else np.float32
    return build(family, fields, state, layer, dtype)
