"""Grouped GEMM: the E ragged expert matmuls as one call of OpenBLAS's cblas_?gemm_batch.

Many experts of a few hundred rows each run OpenBLAS below its large-matrix rate when called one
by one (measured on 2 cores: 64 experts of [384, 128] x [128, 512] at 169 GFLOP/s in a loop of
np.matmul, 225 in one batch call; the batch spreads whole problems over its threads). The OpenBLAS
that NumPy 2.x wheels bundle (numpy.libs/libscipy_openblas64_*.so) exports the batch entry point
as scipy_cblas_sgemm_batch64_ (dgemm for float64); it is called here through cffi's ABI mode
(dlopen of the library NumPy already loaded: the same instance, the same thread pool), so nothing
is compiled against it. Where it is missing (another BLAS, an older OpenBLAS), load() says why
and the experts fall back to their loop of np.matmul.

Each problem is computed by one thread with the same kernel whatever the thread count, so the
results are bit-identical across thread counts (tests/backend/test_grouped_gemm.py); against
np.matmul they agree to round-off (NumPy may pick another kernel path for a transposed operand).
"""
from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Sequence

import numpy as np

from .. import _checks
from ..memory import temporarily

_CDEF = """
void {p}sgemm_batch{s}(int order, const int *ta, const int *tb, const int64_t *m,
    const int64_t *n, const int64_t *k, const float *alpha, const float **a, const int64_t *lda,
    const float **b, const int64_t *ldb, const float *beta, float **c, const int64_t *ldc,
    int64_t groups, const int64_t *sizes);
void {p}dgemm_batch{s}(int order, const int *ta, const int *tb, const int64_t *m,
    const int64_t *n, const int64_t *k, const double *alpha, const double **a,
    const int64_t *lda, const double **b, const int64_t *ldb, const double *beta, double **c,
    const int64_t *ldc, int64_t groups, const int64_t *sizes);
void {t}openblas_set_num_threads{s}(int n);
int {t}openblas_get_num_threads{s}(void);
"""
# (prefix, suffix) of the 64-bit-integer interface, as scipy-openblas64 and OpenBLAS's INTERFACE64
# builds name it.
_NAMES = (("scipy_cblas_", "64_"), ("cblas_", "64_"))
_THREADS = {"scipy_cblas_": "scipy_", "cblas_": ""}  # the thread-count functions' prefix
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
# The batch entry point of scipy-openblas64 0.3.x crashes (SIGSEGV, measured on a SkylakeX Xeon)
# on problems that OpenBLAS hands to its small-matrix kernels, m * n * k <= 100^3 on that CPU;
# problems below 4x that (microseconds of work each) run in np.matmul instead.
SMALL_MNK = 4 * 100 ** 3


def numpy_openblas() -> tuple[str | None, str]:
    """(path of the OpenBLAS shared library NumPy bundles, '') or (None, why not found)."""
    site = os.path.dirname(os.path.dirname(np.__file__))
    pats = [os.path.join(site, "numpy.libs", "libscipy_openblas*.so*"),
            os.path.join(os.path.dirname(np.__file__), ".dylibs", "libscipy_openblas*.dylib")]
    for pat in pats:
        found = sorted(glob.glob(pat))
        if found:
            return found[0], ""
    return None, "NumPy's bundled OpenBLAS (numpy.libs/libscipy_openblas*) was not found"


class GroupedGemm:
    """out_i = a_i @ b_i for a list of 2-D float32 or float64 problems, in one batch call."""

    def __init__(self, ffi, lib, prefix: str, suffix: str, path: str) -> None:
        self.ffi, self.lib, self.path = ffi, lib, path
        t = _THREADS[prefix]
        self._set_threads = getattr(lib, f"{t}openblas_set_num_threads{suffix}")
        self._get_threads = getattr(lib, f"{t}openblas_get_num_threads{suffix}")
        self._fn = {np.dtype(np.float32): getattr(lib, f"{prefix}sgemm_batch{suffix}"),
                    np.dtype(np.float64): getattr(lib, f"{prefix}dgemm_batch{suffix}")}
        self.detail = f"{prefix}sgemm_batch{suffix} in {os.path.basename(path)}"

    def get_num_threads(self) -> int:
        """OpenBLAS's thread count (NumPy's matmuls share it)."""
        return int(self._get_threads())

    def num_threads(self, n: int) -> contextlib.AbstractContextManager[None]:
        """Run a block with OpenBLAS at n threads (n >= 1), restored afterwards."""
        n = _checks.integer("n", n, low=1)
        return temporarily(self.get_num_threads, lambda v: self._set_threads(int(v)), n)

    @staticmethod
    def _operand(a: np.ndarray) -> tuple[int, int] | None:
        """(transpose flag, leading dimension) of a 2-D operand that BLAS reads in place, or None."""
        it = a.itemsize
        s0, s1 = a.strides
        if s1 == it and s0 % it == 0 and s0 >= max(1, a.shape[1]) * it:
            return NO_TRANS, s0 // it
        if s0 == it and s1 % it == 0 and s1 >= max(1, a.shape[0]) * it:
            return TRANS, s1 // it
        return None

    def matmul(self, problems: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """For each (a `[m, k]`, b `[k, n]`, out `[m, n]`): out = a @ b. Operands may be row-major
        or transposed views (strided rows); out rows must be contiguous. A problem BLAS cannot
        read in place, or a small one (SMALL_MNK), runs in np.matmul; the arrays are the caller's, checked
        for shape and dtype here (the experts' own buffers, so no overlap check)."""
        batch = []
        for a, b, out in problems:
            if (a.ndim != 2 or b.ndim != 2 or out.shape != (a.shape[0], b.shape[1])
                    or a.shape[1] != b.shape[0] or not a.dtype == b.dtype == out.dtype):
                raise ValueError(f"grouped matmul: shapes {a.shape} @ {b.shape} -> {out.shape}, "
                                 f"dtypes {a.dtype}, {b.dtype}, {out.dtype}")
            oa, ob = self._operand(a), self._operand(b)
            oc = self._operand(out)
            if (a.dtype not in self._fn or oa is None or ob is None or oc is None
                    or oc[0] != NO_TRANS or a.shape[0] * a.shape[1] * b.shape[1] < SMALL_MNK):
                np.matmul(a, b, out=out)
                continue
            batch.append((a, b, out, oa, ob, oc[1]))
        if not batch:
            return
        by_dtype: dict[np.dtype, list] = {}
        for item in batch:
            by_dtype.setdefault(item[0].dtype, []).append(item)
        for dt, items in by_dtype.items():
            self._call(dt, items)

    def _call(self, dt: np.dtype, items: list) -> None:
        ffi, n = self.ffi, len(items)
        ctype = "float" if dt == np.float32 else "double"
        ptr = f"{ctype} *"
        keep = [x for it in items for x in it[:3]]  # the arrays stay alive through the call
        ta = ffi.new("int[]", [it[3][0] for it in items])
        tb = ffi.new("int[]", [it[4][0] for it in items])
        m = ffi.new("int64_t[]", [it[0].shape[0] for it in items])
        nn = ffi.new("int64_t[]", [it[1].shape[1] for it in items])
        k = ffi.new("int64_t[]", [it[0].shape[1] for it in items])
        lda = ffi.new("int64_t[]", [it[3][1] for it in items])
        ldb = ffi.new("int64_t[]", [it[4][1] for it in items])
        ldc = ffi.new("int64_t[]", [it[5] for it in items])
        alpha = ffi.new(f"{ctype}[]", [1.0] * n)
        beta = ffi.new(f"{ctype}[]", [0.0] * n)
        a = ffi.new(f"{ptr}[]", [ffi.cast(ptr, it[0].ctypes.data) for it in items])
        b = ffi.new(f"{ptr}[]", [ffi.cast(ptr, it[1].ctypes.data) for it in items])
        c = ffi.new(f"{ptr}[]", [ffi.cast(ptr, it[2].ctypes.data) for it in items])
        sizes = ffi.new("int64_t[]", [1] * n)
        self._fn[dt](ROW_MAJOR, ta, tb, m, nn, k, alpha, a, lda, b, ldb, beta, c, ldc, n, sizes)
        del keep


_LOADED: tuple[GroupedGemm | None, str] | None = None


def load(enable: bool | None = None) -> tuple[GroupedGemm | None, str]:
    """(the grouped GEMM, its description) or (None, why it is not used); loaded once.

    Off unless PYMOE_GROUPED_GEMM=1 (or enable=True): OpenBLAS's batch entry point crashed
    (SIGSEGV) on problems its small-matrix kernels take, and under its Haswell, Zen, Nehalem and
    Prescott kernels (OPENBLAS_CORETYPE) its results change in the last bits with the BLAS thread
    count (tests/backend/test_grouped_gemm.py, measured), which would break pymoe's rule that
    the same values give the same bits whatever the thread count. Off, the experts loop over
    np.matmul."""
    global _LOADED
    if enable is None:
        enable = os.environ.get("PYMOE_GROUPED_GEMM") == "1"
    if not enable:
        return None, ("off by default (PYMOE_GROUPED_GEMM=1 turns it on): OpenBLAS's batch "
                      "call crashed on small problems and its bits depend on the BLAS thread "
                      "count under some kernels")
    if _LOADED is None:
        _LOADED = _load()
    return _LOADED


def _load() -> tuple[GroupedGemm | None, str]:
    path, why = numpy_openblas()
    if path is None:
        return None, why
    try:
        import cffi
    except ImportError:
        return None, "cffi is not installed"
    for prefix, suffix in _NAMES:
        ffi = cffi.FFI()
        ffi.cdef(_CDEF.format(p=prefix, s=suffix, t=_THREADS[prefix]))
        try:
            lib = ffi.dlopen(path)
            getattr(lib, f"{prefix}sgemm_batch{suffix}")
            getattr(lib, f"{prefix}dgemm_batch{suffix}")
            getattr(lib, f"{_THREADS[prefix]}openblas_set_num_threads{suffix}")
        except (OSError, AttributeError):
            continue
        return GroupedGemm(ffi, lib, prefix, suffix, path), ""
    return None, (f"{os.path.basename(path)} exports no 64-bit-integer cblas_sgemm_batch "
                  "(OpenBLAS >= 0.3.27 has it)")
