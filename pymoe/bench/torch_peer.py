"""PyTorch CPU peers: the same data movement with torch index ops, and an autograd MoE layer.

torch is optional (a benchmark peer and a test oracle, never a dependency). For each operation
several index-op formulations are timed and the fastest is reported, so the comparison is with
torch at its best, not with one arbitrary spelling.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .ops import Problem


def available() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch not installed (pip install torch==2.13.0 here: a local CPU wheel)"
    return True, f"torch {torch.__version__}, {torch.get_num_threads()} threads"


def torch_op_variants(p: Problem) -> dict[str, dict[str, Callable[[], object]]]:
    """op -> {formulation name -> callable}, all on preallocated outputs where torch allows."""
    import torch

    r, E, C, D, T, K = p.routing, p.E, p.C, p.D, p.T, p.K
    x, dy = torch.from_numpy(p.x), torch.from_numpy(p.dy)
    out = torch.from_numpy(p.expert_out).reshape(E * C, D)
    t_k, j_k = np.nonzero(r.kept)  # kept pairs
    tok = torch.from_numpy(t_k.astype(np.int64))
    slot = torch.from_numpy((r.expert_index[t_k, j_k] * C + r.position[t_k, j_k]).astype(np.int64))
    g_k = torch.from_numpy(p.gate[t_k, j_k].copy())[:, None]
    owner = r.slot_owner.reshape(-1)
    owner_tok = torch.from_numpy(np.where(owner >= 0, owner // K, 0))
    empty = torch.from_numpy(owner < 0)[:, None]
    slot_j = [torch.from_numpy(np.where(r.kept[:, j], r.expert_index[:, j] * C + r.position[:, j],
                                        0)) for j in range(K)]
    gate_j = [torch.from_numpy(p.gate[:, j].copy())[:, None] for j in range(K)]  # 0 where dropped
    kept_j = [torch.from_numpy(r.kept[:, j].astype(p.dtype))[:, None] for j in range(K)]
    buf, y = torch.empty(E * C, D, dtype=x.dtype), torch.empty(T, D, dtype=x.dtype)

    def d_copy(src, w=None):
        buf.zero_()
        rows = src.index_select(0, tok)
        buf.index_copy_(0, slot, rows * g_k if w is not None else rows)
        return buf

    def d_gather(src, w=None):
        torch.index_select(src, 0, owner_tok, out=buf)
        if w is not None:
            buf.mul_(w)
        return buf.masked_fill_(empty, 0)

    owner_w = torch.from_numpy(np.where(owner >= 0, p.gate.reshape(-1)[np.maximum(owner, 0)], 0)
                               .astype(p.dtype))[:, None]

    def c_add(src, weighted=True):
        y.zero_()
        rows = src.index_select(0, slot)
        return y.index_add_(0, tok, rows * g_k if weighted else rows)

    def c_perchoice(src, weighted=True):
        acc = src.index_select(0, slot_j[0]) * (gate_j[0] if weighted else kept_j[0])
        for j in range(1, K):
            acc += src.index_select(0, slot_j[j]) * (gate_j[j] if weighted else kept_j[j])
        return acc

    # The preallocated forms (measured the fastest on CPU): a gather of every slot's token row
    # straight into the expert buffer, then zero the empty slots; combine as one gather per
    # choice into a scratch [T, D] and a fused multiply-add into y.
    empty_idx = torch.from_numpy(np.flatnonzero(owner < 0))
    tmp = torch.empty(T, D, dtype=x.dtype)

    def d_fill(src, w=None):
        torch.index_select(src, 0, owner_tok, out=buf)
        if w is not None:
            buf.mul_(w)
        return buf.index_fill_(0, empty_idx, 0)

    def c_addcmul(src, weighted=True):
        w = gate_j if weighted else kept_j
        torch.index_select(src, 0, slot_j[0], out=tmp)
        torch.mul(tmp, w[0], out=y)
        for j in range(1, K):
            torch.index_select(src, 0, slot_j[j], out=tmp)
            y.addcmul_(tmp, w[j])
        return y

    def gate_grad():
        return (dy.index_select(0, tok) * out.index_select(0, slot)).sum(-1)

    return {
        "dispatch": {"index_select(out=)+index_fill_": lambda: d_fill(x),
                     "index_select+index_copy_": lambda: d_copy(x),
                     "index_select(all slots)+masked_fill_": lambda: d_gather(x)},
        "combine": {"index_select(out=)+addcmul_ per choice": lambda: c_addcmul(out),
                    "index_select+index_add_": lambda: c_add(out),
                    "per-choice index_select": lambda: c_perchoice(out)},
        "dispatch_bwd": {"index_select(out=)+addcmul_ per choice":
                         lambda: c_addcmul(out, weighted=False),
                         "index_select+index_add_": lambda: c_add(out, weighted=False),
                         "per-choice index_select": lambda: c_perchoice(out, weighted=False)},
        "combine_bwd": {"index_select(out=)+index_fill_ + dot": lambda: (d_fill(dy, owner_w),
                                                                         gate_grad()),
                        "index_copy_ + dot": lambda: (d_copy(dy, g_k), gate_grad()),
                        "gather+masked_fill_ + dot": lambda: (d_gather(dy, owner_w), gate_grad())},
    }


def torch_moe(params: dict[str, np.ndarray], x: np.ndarray, k: int, capacity_factor: float | None,
              normalize: bool = False, activation: str = "relu"):
    """The MoE layer in torch index ops (topk, choice-major cumsum slots, per-expert matmuls over
    the kept tokens only, index_add), with autograd. Returns (x, params, y, aux_loss, z_loss) as
    tensors; x and params require grad. Used as the benchmark's peer and as the tests' autograd
    oracle, so the peer is checked to compute what pymoe computes."""
    import torch

    from ..capacity import expert_capacity

    p = {n: torch.tensor(v, requires_grad=True) for n, v in params.items()}
    xt = torch.tensor(x, requires_grad=True)
    T, E = x.shape[0], params["w_router"].shape[1]
    logits = xt @ p["w_router"] + p["b_router"]
    probs = torch.softmax(logits, dim=-1)
    gate, idx = torch.topk(probs, k, dim=-1)
    if normalize:
        gate = gate / gate.sum(-1, keepdim=True)
    with torch.no_grad():
        counts = torch.bincount(idx.reshape(-1), minlength=E)
        C = expert_capacity(T, E, k, capacity_factor, 0, counts.numpy())
        mask = torch.nn.functional.one_hot(idx.t().reshape(-1), E)  # [K*T, E] choice-major
        pos = ((torch.cumsum(mask, 0) - 1) * mask).sum(-1).reshape(k, T).t()
        kept = pos < C
    act = torch.relu if activation == "relu" else (
        lambda a: torch.nn.functional.gelu(a, approximate="tanh"))
    y = torch.zeros_like(xt)
    for e in range(E):
        t_idx, j_idx = torch.nonzero((idx == e) & kept, as_tuple=True)
        h = act(xt.index_select(0, t_idx) @ p["w1"][e] + p["b1"][e])
        out = h @ p["w2"][e] + p["b2"][e]
        y = y.index_add(0, t_idx, out * gate[t_idx, j_idx][:, None])
    aux = E * torch.sum(counts.to(probs.dtype) / (T * k) * probs.mean(0))
    z = torch.mean(torch.logsumexp(logits, -1) ** 2)
    return xt, p, y, aux, z


def torch_layer(params: dict[str, np.ndarray], x: np.ndarray, dy: np.ndarray, k: int,
                capacity_factor: float, aux_loss_coef: float) -> Callable[[], None]:
    """Forward + backward of torch_moe (relu, raw gates), as one benchmark call."""
    import torch

    dyt = torch.tensor(dy)

    def step() -> None:
        _, _, y, aux, _ = torch_moe(params, x, k, capacity_factor)
        ((y * dyt).sum() + aux_loss_coef * aux).backward()

    return step
