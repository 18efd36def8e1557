"""pymoe.precision: round_to against torch's casts, route(..., router_dtype=) and flip_report.

round_to is held to torch bit for bit (its casts are the definition of "a bf16 router" for the
systems pymoe is compared with): exhaustively over every bf16 pattern's float32 neighbours (the
values at, just past and exactly half-way to each rounding boundary), every float16 pattern's, and
a random sweep of float32 bit patterns including NaNs, infinities, subnormals and signed zeros.
"""
from __future__ import annotations

import numpy as np
import pytest

import pymoe
from helpers import (
    FD_RTOL,
    assert_same_bits,
    backend_by_name,
    import_optional,
    numerical_grad,
    rel_error,
)
from pymoe import viz
from pymoe.precision import FlipReport, flip_report, round_to, top_k_margins

U32 = np.uint32


def _torch_cast(u: np.ndarray, dtype: str) -> np.ndarray:
    torch = import_optional("torch", "crosscheck", module_level=False)
    x = torch.from_numpy(u.view(np.float32).copy())
    return x.to(getattr(torch, dtype)).float().numpy().view(np.uint32)


def _mine(u: np.ndarray, dtype: str) -> np.ndarray:
    return round_to(u.view(np.float32), dtype).view(np.uint32)


def bf16_neighbours() -> np.ndarray:
    """Every bf16 pattern p (as float32 p << 16) and the float32 patterns around its rounding
    boundaries: +1, half-way - 1, half-way, half-way + 1, the next pattern - 1."""
    p = np.arange(1 << 16, dtype=U32) << 16  # [65536]
    offsets = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=U32)
    return (p[:, None] + offsets[None, :]).ravel()


def fp16_neighbours() -> np.ndarray:
    """Every float16 pattern as float32, the float32 values half-way to the next float16 (and one
    float32 ulp either side), and the same around float16's overflow and subnormal range."""
    h = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    h = h[np.isfinite(h)]
    f = h.astype(np.float32)  # [n] exact
    away = np.where(np.signbit(h), np.float16(-np.inf), np.float16(np.inf))  # [n] from zero
    with np.errstate(over="ignore"):  # 65504's next is inf: its mid is dropped (65520 in edges)
        nxt = np.nextafter(h, away).astype(np.float32)  # [n] the next float16 away from zero
    with np.errstate(invalid="ignore"):
        mid = ((f.astype(np.float64) + nxt) / 2).astype(np.float32)  # exact in float32
    mid = mid[np.isfinite(mid)]
    u = np.concatenate([f.view(U32), mid.view(U32), mid.view(U32) + 1, mid.view(U32) - 1,
                        f.view(U32) + 1, f.view(U32) - 1])
    return u


def edge_cases() -> np.ndarray:
    vals = [0x00000000, 0x80000000, 0x00000001, 0x80000001, 0x007FFFFF, 0x00800000, 0x7F7FFFFF,
            0xFF7FFFFF, 0x7F7F7FFF, 0x7F7F8000, 0x7F800000, 0xFF800000, 0x7F800001, 0x7FC00000,
            0xFFC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FA00000, 0x477FEFFF, 0x477FF000, 0x477FF001,
            0x33000000, 0x33000001, 0x32FFFFFF, 0xB3000000, 0x387FC000, 0x387FE000]
    return np.array(vals, dtype=U32)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("values", ["bf16 neighbours", "fp16 neighbours", "random", "edges"])
def test_round_to_is_torch_bit_for_bit(dtype, values):
    u = {"bf16 neighbours": bf16_neighbours, "fp16 neighbours": fp16_neighbours,
         "edges": edge_cases,
         "random": lambda: np.random.default_rng(0).integers(0, 1 << 32, 2_000_000,
                                                              dtype=np.uint64).astype(U32)}[values]()
    np.testing.assert_array_equal(_mine(u, dtype), _torch_cast(u, dtype))


def test_round_to_by_hand():
    """Ties to even, overflow, subnormals, signed zeros, NaN: values a reader can check."""
    bf = lambda v: round_to(np.array(v, np.float32), "bfloat16")  # noqa: E731
    # 1 + 2^-8 is half-way between bf16's 1 and 1 + 2^-7: to even (1); 1 + 3*2^-8 goes up (even)
    np.testing.assert_array_equal(bf([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 1 + 2.0 ** -8 + 2.0 ** -20]),
                                  [1.0, 1 + 2.0 ** -6, 1 + 2.0 ** -7])
    assert np.isinf(bf([3.4e38])).all() and bf([-0.0]).view(U32)[0] == 0x80000000
    assert bf([np.nan]).view(U32)[0] == 0xFFFF0000
    h = lambda v: round_to(np.array(v, np.float32), "float16")  # noqa: E731
    np.testing.assert_array_equal(h([65519.0, 65520.0, 2.0 ** -25, 2.0 ** -25 * 1.5, 2.0 ** -24]),
                                  [65504.0, np.inf, 0.0, 2.0 ** -24, 2.0 ** -24])
    assert h([-np.nan]).view(U32)[0] == 0xFFC00000
    out = round_to([1.0, 2.0], "bfloat16")
    assert out.dtype == np.float32 and out.shape == (2,)
    assert round_to(np.float64(1 + 2.0 ** -9), "bfloat16") == 1.0  # float64 via float32


@pytest.mark.parametrize("bad, err, match", [
    ("float8", ValueError, "^dtype: "), (None, ValueError, "^dtype: "),
])
def test_round_to_bad_dtype(bad, err, match):
    with pytest.raises(err, match=match):
        round_to(np.ones(2, np.float32), bad)


def test_round_to_bad_x():
    with pytest.raises(TypeError, match="^x: "):
        round_to(np.ones(2, np.int32), "bfloat16")


# ------------------------------------------------------------------ route(..., router_dtype=)

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("backend", ["numpy", "c"])
def test_router_dtype_routes_the_rounded_logits(dtype, backend, request):
    """route(L, router_dtype=d) is route(round_to(L, d)) bit for bit, on NumPy and C; the scores
    are float32."""
    backend_by_name(backend, request)
    L = (np.random.default_rng(1).normal(size=(64, 16)) * 3).astype(np.float32)
    for preset in ("megatron", "deepseek-v3", "switch"):
        k = 1 if preset == "switch" else 4
        r = pymoe.route(L, k, 1.0, preset=preset, router_dtype=dtype, backend=backend)
        ref = pymoe.route(round_to(L, dtype), k, 1.0, preset=preset, backend="numpy")
        assert r.probs.dtype == np.float32 and r.options.router_dtype == dtype
        for name in ("router_logits", "expert_index", "position", "kept"):
            assert_same_bits(getattr(r, name), getattr(ref, name))
        if backend == "numpy":
            assert_same_bits(r.gate, ref.gate)


def test_router_dtype_is_hf_bf16_router():
    """HF's bf16 router: logits in bf16, softmax(logits, dtype=float32), top-K: the same experts and
    the same float32 scores (to float32 round-off: torch's and NumPy's exp differ by an ulp)."""
    torch = import_optional("torch", "crosscheck", module_level=False)
    L = (np.random.default_rng(2).normal(size=(128, 32)) * 2).astype(np.float32)
    r = pymoe.route(L, 4, None, router_dtype="bfloat16")
    probs = torch.softmax(torch.from_numpy(L).to(torch.bfloat16), dim=-1, dtype=torch.float32)
    np.testing.assert_allclose(r.probs, probs.numpy(), rtol=1e-6, atol=1e-7)
    _, idx = torch.topk(probs, 4, dim=-1)
    untied = top_k_margins(r.probs, 4) > 0  # bf16 makes exact ties; torch.topk's pick is its own
    assert untied.mean() > 0.9
    np.testing.assert_array_equal(np.sort(r.expert_index, 1)[untied], np.sort(idx.numpy(), 1)[untied])


def test_router_dtype_float32_and_float64():
    L64 = np.random.default_rng(3).normal(size=(16, 8))
    assert pymoe.route(L64, 2).probs.dtype == np.float64  # None: as before
    assert pymoe.route(L64, 2, router_dtype="float32").probs.dtype == np.float32
    L32 = L64.astype(np.float32)
    assert pymoe.route(L32, 2, router_dtype="float64").probs.dtype == np.float64
    assert_same_bits(pymoe.route(L32, 2, router_dtype="float32").gate, pymoe.route(L32, 2).gate)
    with pytest.raises(ValueError, match="^router_dtype: "):
        pymoe.route(L32, 2, router_dtype="int8")


def test_router_dtype_gradient_passes_the_rounding():
    """d logits under router_dtype="bfloat16" is route_backward of the rounded logits' routing:
    the cast's gradient is the identity (torch's too). In float64 on the rounded logits it
    matches central differences."""
    L = np.random.default_rng(4).normal(size=(12, 6)).astype(np.float32)
    dgate = np.random.default_rng(5).normal(size=(12, 2)).astype(np.float32)
    r = pymoe.route(L, 2, 1.0, router_dtype="bfloat16", normalize=True)
    ref = pymoe.route(round_to(L, "bfloat16"), 2, 1.0, normalize=True)
    assert_same_bits(pymoe.route_backward(r, dgate, 0.1, 0.1), pymoe.route_backward(ref, dgate, 0.1, 0.1))
    L64 = round_to(L, "bfloat16").astype(np.float64)
    r64 = pymoe.route(L64, 2, 1.0, normalize=True)
    g = pymoe.route_backward(r64, dgate.astype(np.float64), 0.1, 0.1)

    def f() -> float:
        q = pymoe.route(L64, 2, 1.0, normalize=True)
        return float(np.sum(q.gate * dgate) + 0.1 * q.aux_loss + 0.1 * q.z_loss)

    assert rel_error(g, numerical_grad(f, L64)) <= FD_RTOL


def test_layer_router_dtype():
    """MoELayer(router_dtype="bfloat16") routes its float32 logits rounded to bf16."""
    layer = pymoe.MoELayer(8, 16, 8, 2, seed=0, router_dtype="bfloat16")
    x = np.random.default_rng(0).normal(size=(32, 8)).astype(np.float32)
    layer.forward(x)
    plain = pymoe.MoELayer(8, 16, 8, 2, seed=0)
    plain.forward(x)
    assert_same_bits(layer.routing.router_logits, round_to(plain.routing.router_logits, "bfloat16"))
    dx = layer.backward(np.ones_like(x))
    assert dx.shape == x.shape and np.isfinite(dx).all()


# ------------------------------------------------------------------ flip_report

def test_flip_report_literal():
    """Token 0: experts 1 and 2 differ by 2^-10 of 4 (below bf16's 2^-5 there): bf16 rounds both
    to 4 and the tie goes to expert 1 instead of 2 (K = 1). Token 1: margin 1, stays."""
    L = np.array([[0.0, 4.0, 4.0 + 2.0 ** -10, 1.0], [2.0, 1.0, 0.0, 0.0]], np.float32)
    rep = flip_report(L, 1, "bfloat16", capacity_factor=None)
    assert isinstance(rep, FlipReport)
    assert rep.flipped.tolist() == [True, False] and rep.tokens_flipped == 1
    assert rep.pairs_flipped == 1 and rep.token_rate == 0.5 and rep.pair_rate == 0.5
    assert rep.gained.tolist() == [0, 1, 0, 0] and rep.lost.tolist() == [0, 0, 1, 0]
    p = rep.reference.probs
    np.testing.assert_allclose(rep.margins, [p[0, 2] - p[0, 1], p[1, 0] - p[1, 1]], rtol=1e-6)
    text = str(rep)
    assert "1 of 2 tokens (50.00%)" in text and "e1 +1/-0" in text and "e2 +0/-1" in text


def test_flip_report_counts_agree():
    L = (np.random.default_rng(6).normal(size=(2000, 64)) * 3).astype(np.float32)
    rep = flip_report(L, 8, "bfloat16", capacity_factor=None)
    assert rep.tokens_flipped > 0
    assert rep.gained.sum() == rep.lost.sum() == rep.pairs_flipped
    assert rep.pairs_flipped >= rep.tokens_flipped
    # a token can only flip when its margin is within the rounding of the scores
    assert rep.margins[rep.flipped].max() < 0.05 * rep.margins.max()
    none = flip_report(L, 8, "float32", capacity_factor=None)
    assert none.tokens_flipped == 0 and none.pairs_flipped == 0
    full = flip_report(L[:10, :8], 8, "bfloat16")
    assert np.isinf(full.margins).all() and full.tokens_flipped == 0


def test_flip_report_takes_route_keywords():
    L = (np.random.default_rng(7).normal(size=(300, 32)) * 3).astype(np.float32)
    rep = flip_report(L, 8, "float16", preset="deepseek-v3",
                      expert_bias=np.linspace(-0.1, 0.1, 32))
    assert rep.reference.options.score == "sigmoid" and rep.rounded.options.router_dtype == "float16"
    with pytest.raises(TypeError, match="router_dtype"):
        flip_report(L, 8, "bfloat16", router_dtype="float16")
    with pytest.raises(ValueError, match="^dtype: "):
        flip_report(L, 8, "bf16")


def test_top_k_margins():
    s = np.array([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2]])
    np.testing.assert_allclose(top_k_margins(s, 1), [0.2, 0.0])
    np.testing.assert_allclose(top_k_margins(s, 2), [0.1, 0.2])


# ------------------------------------------------------------------ the picture

@pytest.fixture
def report():
    L = (np.random.default_rng(8).normal(size=(3000, 64)) * 3).astype(np.float32)
    return flip_report(L, 8, "bfloat16", capacity_factor=None)


def test_flip_picture(tmp_path, report):
    pytest.importorskip("matplotlib", reason="matplotlib is in the viz extra")
    from helpers import assert_png_matches, layout_problems

    path = tmp_path / "flips.png"
    fig = viz.flip_margins(report, str(path))
    assert_png_matches(path, fig)
    assert layout_problems(fig) == []


def test_flip_picture_text(monkeypatch, capsys, report):
    monkeypatch.setenv("PYMOE_VIZ_TEXT", "1")
    text = viz.flip_margins(report, "unused.png")
    assert text.startswith(f"float32 -> bfloat16, K = 8: {report.tokens_flipped} of 3000")
    rows = [ln for ln in text.splitlines() if ln.startswith("  1e")]
    assert sum(int(ln.split()[-3]) for ln in rows) == 3000
    assert sum(int(ln.split("(")[-1].split()[0]) for ln in rows) == report.tokens_flipped
    assert text in capsys.readouterr().out
    with pytest.raises(TypeError, match="^report: "):
        viz.flip_margins(report.reference, "x.png")
