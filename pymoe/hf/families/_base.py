"""The parts every family entry is made of: the config reader, the Spec a family's config turns
into, and the builder for the block layout most families share."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..layouts import Tensor, flat, linear, mlp_gate_up, mlp_linear, same, stacked

_MISSING = object()

# HF's hidden_act names for the gate of a gated expert -> pymoe's gated form
GATED_FORMS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu"}


class Config:
    """A model config as a plain dict (PretrainedConfig.to_dict() or config.json), read by
    field name; a field the family needs and the config lacks is a ValueError naming both."""

    def __init__(self, fields: Mapping[str, Any], family: str) -> None:
        self.fields, self.family = fields, family

    def get(self, name: str, default: Any = _MISSING) -> Any:
        value = self.fields.get(name, default)
        if value is _MISSING:
            raise ValueError(f"config: {self.family} reads the field {name!r}, which the config "
                             "does not have")
        return value

    def gated_form(self, name: str = "hidden_act") -> str:
        act = self.get(name)
        if act not in GATED_FORMS:
            raise ValueError(f"config: {self.family} experts with {name}={act!r}: pymoe's gated "
                             f"forms take {', '.join(map(repr, GATED_FORMS))}")
        return GATED_FORMS[act]


@dataclass(frozen=True)
class Spec:
    """One block in pymoe's terms: MoELayer(*sizes, **keywords) and where each parameter's
    values are in the block's state dict. ignored: HF tensors the block holds but never uses."""
    sizes: tuple[int, int, int, int]  # D, H, E, K
    keywords: dict[str, Any]
    tensors: tuple[Tensor, ...]
    ignored: tuple[str, ...] = ()
    # the layer dtypes in which HF's training-mode jitter reaches the experts (Switch: only when
    # the model dtype is the router dtype, so that its in-place jitter hits the caller's tensor);
    # None: as keywords["jitter_experts"] says
    jitter_experts_dtypes: tuple[str, ...] | None = None


def jitter_keywords(eps: Any) -> dict[str, Any]:
    """The layer keywords of HF's in-place training-mode jitter x *= U(1 - eps, 1 + eps), which
    the router and the experts both see (Mixtral, MiniMax, DBRX): none when eps is 0 or None."""
    if not eps:
        return {}
    return {"jitter_eps": float(eps), "jitter_experts": True}


SpecFn = Callable[[Config, "int | None", Mapping[str, tuple[int, ...]]], Spec]


@dataclass(frozen=True)
class Family:
    """One row of the table: an HF model_type, the class names of its MoE block (the module
    whose output pymoe reproduces; decoder-layer classes where the branch lives in the layer),
    the preset its default config routes by, the expert form, the Spec function, and where
    its checkpoints keep the block (disk_blocks, disk_renames). router_dtype "float32": HF
    computes the router (and so the gates) in float32 even in a float64 model, so a float64
    pymoe layer agrees with it to float32 round-off only; "model": in the model dtype."""
    name: str
    blocks: tuple[str, ...]
    preset: str
    form: str
    spec: SpecFn = field(repr=False)
    note: str = ""
    router_dtype: str = "float32"  # what HF computes the router in: "float32" or "model"
    disk_blocks: tuple[str, ...] = ("mlp",)  # the block's module name in checkpoint keys
    # on-disk -> in-memory, relative to the block; '../name': the decoder layer's tensor `name`
    disk_renames: Mapping[str, str] = field(default_factory=dict)
    # the block is the decoder layer (its MoE branch spans the modules named in disk_blocks):
    # checkpoint keys are read from all of them, relative to the layer (`layers.N.`)
    disk_layer: bool = False


def standard(cfg: Config, shapes: Mapping[str, tuple[int, ...]], *, preset: str,
             router: str = "gate.weight", experts: str = "experts", transposed: bool = False,
             shared: str | None = None, shared_gate: str | None = None,
             bias: str | None = None, k: str = "num_experts_per_tok",
             form: str | None = None, **keywords: Any) -> Spec:
    """The layout most families share: a router nn.Linear, fused experts `gate_up_proj`
    `[E, 2H, D]` (transposed: `[E, D, 2H]`, used as x @ W) and `down_proj`, optionally one shared
    gated MLP (`<shared>.gate_proj/up_proj/down_proj`), its sigmoid gate nn.Linear(D, 1) and a
    selection bias buffer. keywords: MoELayer keywords (routing conventions from the config)."""
    gate_up, down = f"{experts}.gate_up_proj", f"{experts}.down_proj"
    E = shapes[gate_up][0]
    D, H2 = (shapes[gate_up][1], shapes[gate_up][2]) if transposed else (
        shapes[gate_up][2], shapes[gate_up][1])
    tensors = [linear("w_router", router),
               (same if transposed else stacked)("w1", gate_up),
               (same if transposed else stacked)("w2", down)]
    kw: dict[str, Any] = {"preset": preset, "capacity_factor": None,
                          "activation": form or cfg.gated_form(),
                          "aux_loss_coef": 0.0, "z_loss_coef": 0.0, **keywords}
    if shared is not None:
        g = f"{shared}.gate_proj.weight"
        tensors += [mlp_gate_up("shared_w1", g, f"{shared}.up_proj.weight"),
                    mlp_linear("shared_w2", f"{shared}.down_proj.weight")]
        kw.update(num_shared_experts=1, shared_d_hidden=shapes[g][0])
    else:
        kw.setdefault("num_shared_experts", 0)
    if shared_gate is not None:
        tensors.append(flat("w_shared_gate", shared_gate))
        kw["shared_expert_gate"] = True
    else:
        kw.setdefault("shared_expert_gate", False)
    if bias is not None:
        tensors.append(flat("expert_bias", bias, buffer=True))
    return Spec((D, H2 // 2, E, int(cfg.get(k))), kw, tuple(tensors))
