"""PyTorch CPU peers: the same data movement with torch index ops, and an autograd MoE layer.

torch is optional (a benchmark peer, never a dependency). For each operation
several index-op formulations are timed and the fastest is reported, so the comparison is with
torch at its best, not with one arbitrary spelling.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .ops import Problem


def available() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch not installed (an optional peer: pip install torch)"
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


def torch_layer(params: dict[str, np.ndarray], x: np.ndarray, dy: np.ndarray, k: int,
                capacity_factor: float, aux_loss_coef: float) -> Callable[[], object]:
    """Forward + backward of an MoE layer in torch with autograd (relu, raw gates), as one
    benchmark call; it returns the tensors (y, aux_loss, x, params), x and params with .grad.

    Batched over experts as GShard / Tutel lay it out: kept tokens are copied into an [E, C, D]
    buffer, the experts run as two baddbmm calls, and the outputs are gathered back with their
    gates. Routing follows pymoe's rules (top-K by probability, choice-major slots, capacity from
    pymoe.capacity.expert_capacity); the tests check that it computes pymoe's layer.
    """
    import torch

    from ..capacity import expert_capacity

    p = {n: torch.tensor(v, requires_grad=True) for n, v in params.items()}
    xt, dyt = torch.tensor(x, requires_grad=True), torch.tensor(dy)
    T, E = x.shape[0], params["w_router"].shape[1]
    D = x.shape[1]

    def step() -> tuple[object, object, object, dict[str, object]]:
        for leaf in (xt, *p.values()):
            leaf.grad = None
        logits = xt @ p["w_router"] + p["b_router"]  # [T, E]
        probs = torch.softmax(logits, dim=-1)
        gate, idx = torch.topk(probs, k, dim=-1)  # [T, K]
        with torch.no_grad():
            counts = torch.bincount(idx.reshape(-1), minlength=E)  # [E]
            C = expert_capacity(T, E, k, capacity_factor, 0, counts.numpy())
            mask = torch.nn.functional.one_hot(idx.t().reshape(-1), E)  # [K*T, E] choice-major
            pos = ((torch.cumsum(mask, 0) - 1) * mask).sum(-1).reshape(k, T).t()  # [T, K]
            t_k, j_k = torch.nonzero(pos < C, as_tuple=True)  # kept pairs
            slot = idx[t_k, j_k] * C + pos[t_k, j_k]  # [kept] row of the [E*C, D] buffer
        buf = xt.new_zeros(E * C, D).index_copy(0, slot, xt.index_select(0, t_k))
        h = torch.relu(torch.baddbmm(p["b1"][:, None], buf.view(E, C, D), p["w1"]))  # [E, C, H]
        out = torch.baddbmm(p["b2"][:, None], h, p["w2"]).view(E * C, D)
        y = torch.zeros_like(xt).index_add(0, t_k, out.index_select(0, slot) * gate[t_k, j_k, None])
        aux = E * torch.sum(counts.to(probs.dtype) / (T * k) * probs.mean(0))
        ((y * dyt).sum() + aux_loss_coef * aux).backward()
        return y, aux, xt, p

    return step
