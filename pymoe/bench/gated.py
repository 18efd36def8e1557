"""Gated (SwiGLU) MoE layers as real models have them, against HF transformers' own CPU block.

Two shapes: Mixtral-like (T, D, H, E, K) = (4096, 512, 1024, 8, 2) and DeepSeek-like (4096, 512,
128, 64, 6) with 2 shared experts. HF's block (MixtralSparseMoeBlock, DeepseekV2Moe) is built with
random weights and loaded into pymoe with pymoe.hf.from_transformers, so both compute the same
function on the same weights (dropless, HF's routing). Contenders, interleaved in one rotation:
pymoe's layer on the C backend (also with the opt-in grouped GEMM) and on NumPy, HF's block
under every experts_implementation that runs on CPU (eager, batched_mm, grouped_mm; the fastest
is named in the row), a batched torch autograd layer, and one large sgemm whose rate gives each
row its ideal (the expert FLOPs at that rate). Forward rows run under torch.no_grad / forward
only; fwd+bwd rows include the backward of sum(y * dy) to dx and every weight.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from .layer import sgemm
from .report import Row
from .timing import time_round_robin

SHAPES = {"Mixtral-like": (4096, 512, 1024, 8, 2, 0), "DeepSeek-like": (4096, 512, 128, 64, 6, 2)}
GROUPED = "pymoe, opt-in grouped GEMM"  # the C layer with PYMOE_GROUPED_GEMM=1 (not the default)
HF_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")  # those of transformers' ExpertsInterface
# that run on CPU (deepgemm and sonicmoe are CUDA kernels)


def hf_block(T: int, D: int, H: int, E: int, K: int, S: int, seed: int = 0) -> Any:
    """HF's Mixtral (S = 0) or DeepSeek-V2 (S shared experts) MoE block, float32, random weights."""
    import torch
    import transformers

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if S == 0:
            from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
            cfg = transformers.MixtralConfig(hidden_size=D, intermediate_size=H,
                                             num_local_experts=E, num_experts_per_tok=K)
            block = MixtralSparseMoeBlock(cfg)
        else:
            from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
            cfg = transformers.DeepseekV2Config(hidden_size=D, moe_intermediate_size=H,
                                                n_routed_experts=E, num_experts_per_tok=K,
                                                n_shared_experts=S, topk_method="greedy",
                                                n_group=1, topk_group=1)
            block = DeepseekV2Moe(cfg)
    cfg._experts_implementation = "eager"
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            # std D^-1/2 for the router too: its logits are then O(1), as a trained router's
            # are. At std 1 they were ~22 wide, and 5% of the router's gradient underflowed to
            # subnormals, which made its [T, E] matmuls 17x slower in NumPy (microcode assists).
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    block.config = cfg
    return block


def batched_mm_bytes(T: int, D: int, H: int, K: int) -> int:
    """What HF's batched_mm holds at once in a fwd+bwd: it gathers every routed row's expert
    weights (gate_up [T K, 2H, D] and down [T K, D, H], float32) and their gradients."""
    return 2 * T * K * 3 * H * D * 4


BATCHED_MM_MAX_BYTES = 4 * 10 ** 9  # past this batched_mm is left out, with the reason


def _hf_calls(block, x: np.ndarray, dy: np.ndarray, skip: tuple[str, ...] = ()
              ) -> dict[str, tuple[Callable, Callable]]:
    """impl -> (forward, forward+backward) of HF's block (but those in skip)."""
    import torch

    xt, dyt = torch.tensor(x[None]), torch.tensor(dy[None])

    def fwd(impl: str) -> Callable[[], object]:
        def run() -> object:
            block.config._experts_implementation = impl
            with torch.no_grad():
                return block(xt)
        return run

    def step(impl: str) -> Callable[[], object]:
        def run() -> object:
            block.config._experts_implementation = impl
            block.zero_grad(set_to_none=True)
            xg = xt.clone().requires_grad_(True)
            out = block(xg)
            y = out[0] if isinstance(out, tuple) else out
            (y * dyt).sum().backward()
            return xg.grad
        return run

    return {impl: (fwd(impl), step(impl)) for impl in HF_IMPLEMENTATIONS if impl not in skip}


def torch_gated_layer(layer, x: np.ndarray, dy: np.ndarray, backward: bool) -> Callable[[], object]:
    """A batched torch autograd layer computing pymoe's `layer` (softmax top-K, its gates,
    dropless): tokens copied into an [E, C, D] buffer with C the largest expert's count, the
    experts as baddbmm calls, SwiGLU, outputs gathered back with their gates; shared experts as
    two more matmuls over every token."""
    import torch

    p = {n: torch.tensor(v, requires_grad=True) for n, v in layer.params.items()}
    xt, dyt = torch.tensor(x), torch.tensor(dy)
    T, D = x.shape
    E, K = layer.num_experts, layer.k
    norm, scale = layer.options.normalize, layer.options.scaling_factor

    def swiglu(a: Any) -> Any:
        g, u = a.chunk(2, dim=-1)
        return torch.nn.functional.silu(g) * u

    def run() -> object:
        for leaf in p.values():
            leaf.grad = None
        xg = xt.clone().requires_grad_(backward)
        with torch.set_grad_enabled(backward):
            probs = torch.softmax(xg @ p["w_router"] + p["b_router"], dim=-1)  # [T, E]
            gate, idx = torch.topk(probs, K, dim=-1)  # [T, K]
            if norm:
                gate = gate / gate.sum(-1, keepdim=True)
            if scale:
                gate = gate * scale
            with torch.no_grad():
                flat = idx.reshape(-1)
                counts = torch.bincount(flat, minlength=E)
                C = int(counts.max())
                order = torch.argsort(flat, stable=True)
                starts = torch.cumsum(counts, 0) - counts
                pos = torch.empty_like(flat)
                pos[order] = torch.arange(flat.numel()) - starts[flat[order]]
                slot = flat * C + pos  # [T*K]
                tok = torch.arange(T).repeat_interleave(K)
            buf = xg.new_zeros(E * C, D).index_copy(0, slot, xg.index_select(0, tok))
            h = swiglu(torch.baddbmm(p["b1"][:, None], buf.view(E, C, D), p["w1"]))
            out = torch.baddbmm(p["b2"][:, None], h, p["w2"]).view(E * C, D)
            y = torch.zeros_like(xg).index_add(0, tok, out.index_select(0, slot)
                                               * gate.reshape(-1, 1))
            if "shared_w1" in p:
                for s in range(p["shared_w1"].shape[0]):
                    hs = swiglu(xg @ p["shared_w1"][s] + p["shared_b1"][s])
                    y = y + hs @ p["shared_w2"][s] + p["shared_b2"][s]
            if backward:
                (y * dyt).sum().backward()
        return y

    return run


def expert_flops(layer, rows: int, T: int) -> int:
    """Forward FLOPs of the expert matmuls: rows routed rows through D -> 2H -> D, and T rows
    through each shared expert's D -> 2Hs -> Hs -> D (backward: twice that)."""
    D, H = layer.d_model, layer.d_hidden
    S = layer.num_shared_experts
    Hs = layer.shared_d_hidden or H
    return 2 * rows * D * 3 * H + 2 * S * T * D * 3 * Hs


def bench_gated(name: str, *, repeats: int = 5, torch: bool = True, numpy: bool = True,
                seed: int = 0, small: bool = False) -> list[Row]:
    """Rows for one of SHAPES: fwd and fwd+bwd of pymoe (C, NumPy), HF's fastest CPU block, the
    batched torch layer, each with its time as a multiple of the same-run sgemm-rate ideal.
    small: the shape with T, D, H divided by 8 (a smoke test)."""
    from ..hf import from_transformers

    T, D, H, E, K, S = SHAPES[name]
    if small:
        T, D, H = T // 8, D // 8, H // 8
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, D), dtype=np.float32)
    dy = rng.standard_normal((T, D), dtype=np.float32)
    block = hf_block(T, D, H, E, K, S, seed)
    loaded = from_transformers(block)
    layers = {"pymoe C": on_backend(loaded, "c")}
    if numpy:
        layers["pymoe numpy"] = on_backend(loaded, "numpy")
    from ..backend.grouped_gemm import load as load_grouped
    if load_grouped(enable=True)[0] is not None:  # NumPy's OpenBLAS has cblas_sgemm_batch
        layers[GROUPED] = on_backend(loaded, "c")
    ref = layers["pymoe C"]
    ref.forward(x)
    rows = int(ref.routing.kept.sum())
    fl = expert_flops(ref, rows, T)
    sec = (f"gated layer ({name}, swiglu): T={T} D={D} H={H} E={E} K={K} shared={S} float32 "
           f"dropless ({rows} routed rows)")
    skipped = {}
    need = batched_mm_bytes(T, D, H, K)
    if need > BATCHED_MM_MAX_BYTES:
        skipped["HF batched_mm"] = (f"skipped: it gathers each routed row's expert weights, "
                                    f"about {need / 1e9:.0f} GB with their gradients")
    hf = _hf_calls(block, x, dy, skip=tuple(n[3:] for n in skipped))
    out: list[Row] = []
    for op, mult in (("fwd", 1), ("fwd+bwd", 3)):
        fns: dict[str, Callable[[], object]] = {}
        for lname, m in layers.items():
            fns[lname] = _pymoe_call(m, x, dy, op == "fwd+bwd")
            if lname == GROUPED:
                fns[lname] = _grouped_gemm_on(fns[lname])
        for impl, (f, fb) in hf.items():
            fns[f"HF {impl}"] = f if op == "fwd" else fb
        if torch:
            fns["torch batched autograd"] = torch_gated_layer(ref, x, dy, op == "fwd+bwd")
        calls = max(1, round(mult * fl / (2 * T * D * 2 * H) / 2))
        gemm, gemm_flops, gname = sgemm(T, D, 2 * H, calls)
        fns[gname] = gemm
        times = time_round_robin(fns, repeats)
        rate = calls * gemm_flops / times[gname][0]
        ideal = mult * fl / rate
        best_hf = min((n for n in times if n.startswith("HF ")), key=lambda n: times[n][0])
        for impl, (t, runs) in times.items():
            if impl == gname:
                out.append(Row(sec, op, "sgemm (the rate)", t / calls * 1e3, gflops=rate / 1e9,
                               note=f"{gname}; ideal {ideal * 1e3:.1f} ms"))
                continue
            if impl.startswith("HF ") and impl != best_hf:
                out.append(Row(sec, op, impl, t * 1e3, gflops=mult * fl / t / 1e9,
                               note=f"{t / ideal:.2f}x ideal"))
                continue
            label = "HF block (fastest)" if impl == best_hf else impl
            note = f"{t / ideal:.2f}x ideal" + (f", {impl[3:]}" if impl == best_hf else "")
            out.append(Row(sec, op, label, t * 1e3, gflops=mult * fl / t / 1e9,
                           note=note + ("" if runs > 1 else ", one timed call (slow)")))
        out += [Row(sec, op, impl, None, note=why) for impl, why in skipped.items()]
    return out


def _grouped_gemm_on(fn: Callable[[], object]) -> Callable[[], object]:
    """fn with PYMOE_GROUPED_GEMM=1 while it runs: the switch the C backend's experts read on
    every call (pymoe.backend.grouped_gemm.load)."""
    def run() -> object:
        before = os.environ.get("PYMOE_GROUPED_GEMM")
        os.environ["PYMOE_GROUPED_GEMM"] = "1"
        try:
            return fn()
        finally:
            if before is None:
                del os.environ["PYMOE_GROUPED_GEMM"]
            else:
                os.environ["PYMOE_GROUPED_GEMM"] = before
    return run


def _pymoe_call(layer, x: np.ndarray, dy: np.ndarray, backward: bool) -> Callable[[], object]:
    if backward:
        return lambda: (layer.forward(x), layer.backward(dy))
    return lambda: layer.forward(x)


def on_backend(layer, name: str):
    """A copy of `layer` (its own parameters) on backend `name`, through the pickling state,
    which keeps the backend's name and resolves it on loading."""
    state = layer.__getstate__()
    state["params"] = {n: v.copy() for n, v in layer.params.items()}
    state["_backend_request"] = name
    out = type(layer).__new__(type(layer))
    out.__setstate__(state)
    return out


def sweep_gated(Ts: tuple[int, ...], *, repeats: int = 3, seed: int = 0,
                small: bool = False) -> list[Row]:
    """pymoe C's gated layer (Mixtral-like D, H, E, K; small: D, H / 8) fwd+bwd at each T: time
    per token."""
    from ..hf import from_transformers

    _, D, H, E, K, S = SHAPES["Mixtral-like"]
    if small:
        D, H = D // 8, H // 8
    block = hf_block(max(Ts), D, H, E, K, S, seed)
    layer = on_backend(from_transformers(block), "c")
    sec = f"gated layer fwd+bwd vs T (Mixtral-like D={D} H={H} E={E} K={K}, pymoe C)"
    rows = []
    rng = np.random.default_rng(seed)
    for T in Ts:
        x = rng.standard_normal((T, D), dtype=np.float32)
        dy = rng.standard_normal((T, D), dtype=np.float32)
        t, _ = time_round_robin({"pymoe C": _pymoe_call(layer, x, dy, True)}, repeats)["pymoe C"]
        rows.append(Row(sec, "fwd+bwd", "pymoe C", t * 1e3, T=T,
                        note=f"{t / T * 1e6:.1f} us per token"))
    return rows
