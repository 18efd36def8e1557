"""The grouped GEMM (one cblas_?gemm_batch call for the ragged expert matmuls, opt-in with
PYMOE_GROUPED_GEMM=1) against np.matmul, and the C layer that uses it against the NumPy layer.
Its bits across BLAS thread counts are not a contract: under OpenBLAS's Haswell, Zen, Nehalem and
Prescott kernels they change with the thread count (why it is off by default)."""
import numpy as np
import pytest

from pymoe import MoELayer, backends, get_backend
from pymoe.backend import grouped_gemm

GG, WHY = grouped_gemm.load(enable=True)
needs_gg = pytest.mark.skipif(GG is None, reason=f"no grouped GEMM: {WHY}")
needs_c = pytest.mark.skipif(not backends()["c"].available, reason="C core not built")


def _problems(dtype, seed=0):
    """Ragged problems as the experts make them: row-major, transposed views (x.T @ dy) and
    row slices of larger buffers (strided rows), an empty one among them."""
    rng = np.random.default_rng(seed)
    out = []
    for m, k, n in [(37, 64, 48), (0, 64, 48), (130, 17, 5), (1, 8, 96), (64, 128, 64),
                    (300, 128, 160), (129, 256, 200), (5, 512, 1024)]:  # past SMALL_MNK too
        big = rng.standard_normal((m + 3, k + 5)).astype(dtype)
        a = big[:m, :k]  # strided rows
        b = rng.standard_normal((n, k)).astype(dtype).T  # a transposed operand
        out.append((a, b, np.empty((m, n), dtype)))
        at = rng.standard_normal((k, m)).astype(dtype)
        out.append((at.T, rng.standard_normal((k, n)).astype(dtype), np.empty((m, n), dtype)))
    return out


@needs_gg
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grouped_matmul_matches_numpy(dtype):
    probs = _problems(dtype)
    GG.matmul(probs)
    # BLAS's blocking (and so the order of each dot product's partial sums) may differ between
    # the batch entry point and the one np.matmul calls: round-off apart, not bits.
    tol = 2e-5 if dtype == np.float32 else 1e-12
    for a, b, out in probs:
        np.testing.assert_allclose(out, a @ b, rtol=tol, atol=tol * np.sqrt(a.shape[1]))


@needs_gg
def test_problems_reach_the_batch_call():
    big = [(a, b) for a, b, _ in _problems(np.float32)
           if a.shape[0] * a.shape[1] * b.shape[1] >= grouped_gemm.SMALL_MNK]
    assert len(big) >= 4  # the tests above exercise the batch entry point, not only np.matmul


@needs_gg
def test_grouped_matmul_falls_back_for_what_blas_cannot_read():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((20, 30)).astype(np.float32)[:, ::2]  # neither rows nor columns unit
    b = rng.standard_normal((15, 7)).astype(np.float32)
    out = np.empty((20, 7), np.float32)
    GG.matmul([(a, b, out)])
    np.testing.assert_array_equal(out, np.matmul(a, b))  # np.matmul ran it: the same call
    with pytest.raises(ValueError, match="grouped matmul: shapes"):
        GG.matmul([(a, b, np.empty((20, 8), np.float32))])


def test_off_by_default(monkeypatch):
    monkeypatch.delenv("PYMOE_GROUPED_GEMM", raising=False)
    gg, why = grouped_gemm.load()
    assert gg is None and "PYMOE_GROUPED_GEMM=1" in why
    assert backends()["c"].available is False or get_backend("c").grouped_gemm is None
    monkeypatch.setenv("PYMOE_GROUPED_GEMM", "1")
    assert (grouped_gemm.load()[0] is None) == (GG is None)


def _layer_step(backend, **kw):
    T, D, H, E, K = 512, 128, 96, 6, 2  # experts of ~170 rows: past SMALL_MNK
    rng = np.random.default_rng(3)
    x = rng.standard_normal((T, D)).astype(np.float32)
    dy = rng.standard_normal((T, D)).astype(np.float32)
    m = MoELayer(D, H, E, K, backend=backend, seed=4, **kw)
    y = m.forward(x)
    dx = m.backward(dy)
    return y, dx, m.grads


GATED = dict(activation="swiglu", num_shared_experts=2, shared_d_hidden=64)


@needs_c
@pytest.mark.parametrize("grouped", ["0", "1"], ids=["loop", "grouped"])
@pytest.mark.parametrize("kw", [{}, GATED], ids=["relu", "swiglu+2 shared"])
def test_c_layer_matches_the_numpy_layer(kw, grouped, monkeypatch):
    monkeypatch.setenv("PYMOE_GROUPED_GEMM", grouped)
    y, dx, g = _layer_step("c", **kw)
    y0, dx0, g0 = _layer_step("numpy", **kw)
    # the same steps; only the BLAS calls (batched here, one by one there) may round apart:
    # float32 sums of 96-128 terms blocked in another order, outputs of size ~10 (1.9e-5 apart
    # measured under OpenBLAS's Haswell kernel), hence the absolute 1e-4
    np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dx, dx0, rtol=1e-5, atol=1e-4)
    for name in g0:
        np.testing.assert_allclose(g[name], g0[name], rtol=1e-4, atol=1e-4, err_msg=name)


@needs_c
@pytest.mark.parametrize("grouped", ["0", "1"], ids=["loop", "grouped"])
def test_c_layer_bits_do_not_depend_on_the_c_thread_count(grouped, monkeypatch):
    """The C core's contract: its thread count never changes a bit (BLAS's own count is BLAS's)."""
    monkeypatch.setenv("PYMOE_GROUPED_GEMM", grouped)
    be = get_backend("c")
    runs = []
    for core in (1, 2, 3):
        with be.num_threads(core):
            runs.append(_layer_step("c", **GATED))
    for y, dx, g in runs[1:]:
        np.testing.assert_array_equal(y, runs[0][0])
        np.testing.assert_array_equal(dx, runs[0][1])
        for name in g:
            np.testing.assert_array_equal(g[name], runs[0][2][name], err_msg=name)
