"""The C core (csrc/, built by pip through cffi) as a pymoe backend.

Every array is checked here (dtype, shape, contiguity, index ranges) before it crosses into C; the
C functions check sizes and indices again and return an error code, which becomes a ValueError
with the C core's own message for it (pymoe_error_string).
The C code computes exactly what pymoe.indexed computes: dispatch and combine bit for bit,
the gate gradient to round-off (its dot products sum in a different order than NumPy's).

Loading sets OMP_WAIT_POLICY=PASSIVE unless it is already set: by default OpenMP threads spin after
each parallel region and take the cores from the BLAS threads of the expert matmuls that follow
(measured on a 2-core machine: a 1024x512x2048 float32 matmul fell from 173 to 106 GFLOP/s).
That cannot reach a runtime loaded before pymoe's (torch's wheel bundles libgomp.so.1: imported
first, it is the C core's runtime too, and it spins), so MoELayer also runs its C steps on one
thread between its BLAS calls (between_blas_calls).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

import numpy as np

from .. import _checks
from ..memory import temporarily
from . import install as _install
from .c_softmax import softmax_lse_threads
from .protocol import BackendInfo

C_DTYPES = (np.float32, np.float64)
FLOAT_OPS = {  # op -> (its float entry point, its double one), as csrc/pymoe.h declares them
    "top_k": ("pymoe_top_k_f32", "pymoe_top_k_f64"),
    "dispatch": ("pymoe_dispatch_f32", "pymoe_dispatch_f64"),
    "dispatch_naive": ("pymoe_dispatch_naive_f32", "pymoe_dispatch_naive_f64"),
    "combine": ("pymoe_combine_f32", "pymoe_combine_f64"),
    "combine_naive": ("pymoe_combine_naive_f32", "pymoe_combine_naive_f64"),
    "gate_grad": ("pymoe_gate_grad_f32", "pymoe_gate_grad_f64"),
    "gate_grad_naive": ("pymoe_gate_grad_naive_f32", "pymoe_gate_grad_naive_f64"),
    "bias_relu": ("pymoe_bias_relu_f32", "pymoe_bias_relu_f64"),
    "relu_backward": ("pymoe_relu_backward_f32", "pymoe_relu_backward_f64"),
    **{f"{form}{part}": (f"pymoe_{form}{part}_f32", f"pymoe_{form}{part}_f64")
       for form in ("gelu", "relu2", "silu", "swiglu", "geglu", "swiglu_oai", "swiglu_clamped",
                    "swiglu_clamp_after", "swiglu_softcap") for part in ("", "_bias", "_backward")},
}
_CTYPES = {np.dtype(np.float32): "float[]", np.dtype(np.float64): "double[]",
           np.dtype(np.int64): "int64_t[]"}
_STATUS_FILE = _install.STATUS_FILE  # next to the extension, in the package folder


try:
    from numpy.exceptions import TooHardError as _TooHardError
except ImportError:  # numpy < 1.25
    _TooHardError = np.TooHardError  # type: ignore[attr-defined,misc]


def _overlaps(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether a and b share a byte. Bounds first (cheap); then the exact test, so interleaved
    views such as buf[:, 0::2] and buf[:, 1::2] do not count; too hard to decide counts as yes."""
    if not np.may_share_memory(a, b):
        return False
    try:
        # (numpy's stubs allow only -1 and 0 here; the function takes any bound)
        return bool(np.shares_memory(a, b, max_work=100_000))  # type: ignore[arg-type]
    except _TooHardError:
        return True


def _why_missing(err: ImportError) -> str:
    return _install.why_core_missing(str(err), _STATUS_FILE)


def load() -> tuple[CBackend | None, BackendInfo]:
    """The C backend and its BackendInfo, or (None, the reason it is unavailable)."""
    if os.environ.get("PYMOE_DISABLE_C") == "1":
        return None, BackendInfo("c", False, "disabled by PYMOE_DISABLE_C=1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read by libgomp when it loads
    try:
        from .._pymoe_c import ffi, lib
    except ImportError as err:
        return None, BackendInfo("c", False, _why_missing(err))
    be = CBackend(ffi, lib)
    return be, BackendInfo("c", True, f"C core ({be.build_config}, {be.default_num_threads} threads)")


class CBackend:
    """Slot assignment, dispatch, combine and gate gradient in C (csrc/pymoe.h)."""
    name = "c"

    def __init__(self, ffi, lib) -> None:
        self.ffi, self.lib = ffi, lib
        self.build_config = ffi.string(lib.pymoe_build_config()).decode()
        self.openmp = bool(lib.pymoe_openmp_enabled())
        self.default_num_threads = int(lib.pymoe_get_max_threads())  # OpenMP's count at load

    # ------------------------------------------------------------ plumbing
    def _ptr(self, a: np.ndarray | None):
        if a is None:
            return self.ffi.NULL
        # Looked up by dtype equality (np.longlong equals int64) and asserted native: C reads
        # raw bytes, so a byte-swapped or unexpected array must never get this far.
        ctype = _CTYPES.get(a.dtype) if a.dtype.isnative and a.flags.c_contiguous else None
        if ctype is None:
            raise AssertionError(f"pymoe bug: {a.dtype} {a.shape} array about to reach C")
        return self.ffi.from_buffer(ctype, a, require_writable=False)

    def _check(self, func: str, code: int) -> None:
        if code != 0:
            why = self.ffi.string(self.lib.pymoe_error_string(code)).decode()
            raise ValueError(f"C core {func}: {why} (error code {code})")

    @staticmethod
    def _out(out: np.ndarray | None, shape: tuple[int, ...], dtype: np.dtype,
             inputs: Mapping[str, object]) -> np.ndarray:
        """A fresh output array, or `out` after checking that C may write all of it and that it
        shares no memory with any input (the C loops would read what they already wrote)."""
        if out is None:
            return np.empty(shape, dtype)
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out: expected a numpy array, got {type(out).__name__}")
        if out.shape != shape or out.dtype != dtype:
            raise ValueError(f"out: expected shape {list(shape)} and dtype {np.dtype(dtype)}, "
                             f"got {out.shape} {out.dtype}")
        if not (out.flags.c_contiguous and out.flags.writeable):
            raise ValueError("out: expected a C-contiguous, writeable array")
        for name, a in inputs.items():
            if isinstance(a, np.ndarray) and _overlaps(out, a):
                raise ValueError(f"out: shares memory with {name}; pass a separate array")
        return out

    def _fn(self, op: str, a: np.ndarray):
        """The entry point of `op` for a's dtype (FLOAT_OPS names each one, as csrc/pymoe.h)."""
        return getattr(self.lib, FLOAT_OPS[op][0 if a.dtype == np.float32 else 1])

    # ------------------------------------------------------------ operations
    # The argument checks are pymoe._checks' (the same as the NumPy backend's), restricted to
    # float32/float64; arrays are then made C-contiguous (copied only when they are not).

    def softmax_lse(self, router_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> (probs `[T, E]`, logsumexp `[T]`): router.softmax_lse bit for bit, its row blocks
        on this backend's thread count (NumPy's exp sets the bits; c_softmax says why)."""
        logits = _checks.float_arg("router_logits", router_logits, (None, None), C_DTYPES, "C")
        return softmax_lse_threads(logits, self.get_num_threads())  # (C-contiguous there)

    def top_k(self, score: np.ndarray, k: int, bias: np.ndarray | None = None,
              probs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """-> (expert_index `<int64>[T, K]`, expert_load `<int64>[E]`, prob_sum `[E]` or None).

        The same integers as pymoe.topk.top_k(score + bias, k) and capacity.expert_load, and
        prob_sum bit for bit probs.sum(axis=0); bias and probs are cast to score's dtype.
        """
        score, k, bias, probs = _checks.top_k_args(score, k, bias, probs, C_DTYPES, "C")
        score = np.ascontiguousarray(score)
        bias, probs = (None if a is None else np.ascontiguousarray(a) for a in (bias, probs))
        T, E = score.shape
        expert_index = np.empty((T, k), np.int64)
        load = np.empty(E, np.int64)
        prob_sum = None if probs is None else np.empty(E, score.dtype)
        fn = self._fn("top_k", score)
        self._check("top_k", fn(self._ptr(expert_index), self._ptr(load), self._ptr(prob_sum),
                                self._ptr(score), self._ptr(bias), self._ptr(probs), T, k, E))
        return expert_index, load, prob_sum

    def assign_slots(self, expert_index: np.ndarray, token_order: np.ndarray | None,
                     num_experts: int, capacity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (position `<int64>[T, K]`, -1 where dropped; slot_owner `<int64>[E, C]`;
        expert_load `<int64>[E]` before dropping).

        Same integers as pymoe.priority.position_in_expert followed by pymoe.capacity.drop;
        token_order None means 0, 1, ..., T-1.
        """
        expert_index, token_order, E, C = _checks.slot_args(expert_index, token_order,
                                                             num_experts, capacity)
        expert_index = np.ascontiguousarray(expert_index)
        if token_order is not None:
            token_order = np.ascontiguousarray(token_order)
        T, K = expert_index.shape
        position = np.empty((T, K), np.int64)
        owner = np.empty((E, C), np.int64)
        load = np.empty(E, np.int64)
        code = self.lib.pymoe_assign_slots(self._ptr(position), self._ptr(owner), self._ptr(load),
                                           self._ptr(expert_index), self._ptr(token_order),
                                           T, K, E, C)
        self._check("assign_slots", code)
        return position, owner, load

    def assign_slots_ordered(self, expert_index: np.ndarray, order: np.ndarray, num_experts: int,
                             capacity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (position, slot_owner, expert_load), the integers of slots.assign_slots_ordered."""
        index, order, E, C = _checks.ordered_slot_args(expert_index, order, num_experts, capacity)
        index, order = np.ascontiguousarray(index), np.ascontiguousarray(order)
        T, K = index.shape
        position = np.empty((T, K), np.int64)
        owner = np.empty((E, C), np.int64)
        load = np.empty(E, np.int64)
        code = self.lib.pymoe_assign_slots_ordered(
            self._ptr(position), self._ptr(owner), self._ptr(load), self._ptr(index),
            self._ptr(order), order.size, T, K, E, C)
        self._check("assign_slots_ordered", code)
        return position, owner, load

    def keep_by_score(self, expert_index: np.ndarray, order: np.ndarray, score: np.ndarray,
                      num_experts: int, capacity: int) -> np.ndarray:
        """-> keep `<bool>[T, K]`, the mask of capacity.keep_by_score."""
        index, order, E, C = _checks.ordered_slot_args(expert_index, order, num_experts, capacity)
        score = _checks.float_array("score", score, shape=index.shape)
        index, order = np.ascontiguousarray(index), np.ascontiguousarray(order)
        score = np.ascontiguousarray(score, dtype=np.float64)  # exact for float16/32 scores
        T, K = index.shape
        keep = np.empty((T, K), np.bool_)
        code = self.lib.pymoe_keep_by_score(
            self.ffi.from_buffer("uint8_t[]", keep.view(np.uint8)), self._ptr(index),
            self._ptr(order), self._ptr(score), order.size, T, K, E, C)
        self._check("keep_by_score", code)
        return keep

    def dispatch(self, x: np.ndarray, slot_owner: np.ndarray, k: int,
                 weight: np.ndarray | None = None, *, naive: bool = False,
                 out: np.ndarray | None = None) -> np.ndarray:
        """expert_in `[E, C, D]` (pymoe.indexed.dispatch_indexed); weight is cast to x's dtype.

        out: an optional `[E, C, D]` array to overwrite (saves the page faults of a fresh one).
        """
        inputs = {"x": x, "slot_owner": slot_owner, "weight": weight}
        x, slot_owner, k, weight = _checks.dispatch_args(x, slot_owner, k, weight, C_DTYPES, "C")
        x, slot_owner = np.ascontiguousarray(x), np.ascontiguousarray(slot_owner)
        if weight is not None:
            weight = np.ascontiguousarray(weight)
        T, D = x.shape
        E, C = slot_owner.shape
        out = self._out(out, (E, C, D), x.dtype, inputs)
        fn = self._fn("dispatch_naive" if naive else "dispatch", x)
        self._check("dispatch", fn(self._ptr(out), self._ptr(x), self._ptr(slot_owner),
                                   self._ptr(weight), T, k, E, C, D))
        return out

    def _pairs(self, expert_out, expert_index, position):
        return tuple(np.ascontiguousarray(a)
                     for a in _checks.pair_args(expert_out, expert_index, position, C_DTYPES, "C"))

    def combine(self, expert_out: np.ndarray, expert_index: np.ndarray, position: np.ndarray,
                weight: np.ndarray | None = None, *, naive: bool = False,
                out: np.ndarray | None = None) -> np.ndarray:
        """y `[T, D]` (pymoe.indexed.combine_indexed); weight is cast to expert_out's dtype.

        out: an optional `[T, D]` array to overwrite.
        """
        inputs = {"expert_out": expert_out, "expert_index": expert_index, "position": position,
                  "weight": weight}
        expert_out, expert_index, position = self._pairs(expert_out, expert_index, position)
        E, C, D = expert_out.shape
        T, K = expert_index.shape
        if weight is not None:
            weight = _checks.float_arg("weight", weight, (T, K), C_DTYPES, "C")
            weight = np.ascontiguousarray(weight, dtype=expert_out.dtype)
        y = self._out(out, (T, D), expert_out.dtype, inputs)
        fn = self._fn("combine_naive" if naive else "combine", y)
        self._check("combine", fn(self._ptr(y), self._ptr(expert_out), self._ptr(expert_index),
                                  self._ptr(position), self._ptr(weight), T, K, E, C, D))
        return y

    def gate_grad(self, dy: np.ndarray, expert_out: np.ndarray, expert_index: np.ndarray,
                  position: np.ndarray, *, naive: bool = False) -> np.ndarray:
        """dgate `[T, K]` (pymoe.indexed.gate_grad_indexed)."""
        expert_out, expert_index, position = self._pairs(expert_out, expert_index, position)
        E, C, D = expert_out.shape
        T, K = expert_index.shape
        dy = np.ascontiguousarray(_checks.float_arg("dy", dy, (T, D), C_DTYPES, "C"),
                                  dtype=expert_out.dtype)
        dgate = np.empty((T, K), expert_out.dtype)
        fn = self._fn("gate_grad_naive" if naive else "gate_grad", dy)
        self._check("gate_grad", fn(self._ptr(dgate), self._ptr(dy), self._ptr(expert_out),
                                    self._ptr(expert_index), self._ptr(position), T, K, E, C, D))
        return dgate

    def bias_relu(self, a: np.ndarray, bias: np.ndarray) -> None:
        """a = relu(a + bias) in place, a `[n, H]`, bias `[H]`, in one pass: experts.bias_relu
        bit for bit."""
        a, bias = _checks.epilogue_args("a", a, "bias", bias, "bias", C_DTYPES, "C")
        fn = self._fn("bias_relu", a)
        self._check("bias_relu", fn(self._ptr(a), self._ptr(bias), *a.shape))

    def relu_backward(self, grad: np.ndarray, hidden: np.ndarray) -> None:
        """grad *= hidden > 0 in place, both `[n, H]`, in one pass: experts.relu_backward bit for
        bit."""
        grad, hidden = _checks.epilogue_args("grad", grad, "hidden", hidden, "hidden", C_DTYPES,
                                             "C")
        fn = self._fn("relu_backward", grad)
        self._check("relu_backward", fn(self._ptr(grad), self._ptr(hidden), *grad.shape))

    def form_forward(self, form: str, a: np.ndarray, out: np.ndarray, *args: float,
                     bias: np.ndarray | None = None) -> None:
        """out = h `[n, H]` of expert form `form` from a `[n, W]` in one pass
        (csrc/expert_forms.h): expert_forms.<form> bit for bit. bias `[W]`: a += bias first,
        in place, in the same pass."""
        if bias is not None:
            a, bias = _checks.epilogue_args("a", a, "bias", bias, "bias", C_DTYPES, "C")
        form, a, out, _, args = _checks.form_args(form, a, out, None, args, C_DTYPES, "C")
        if bias is None:
            fn = self._fn(form, a)
            self._check(form, fn(self._ptr(out), self._ptr(a), *args, *out.shape))
            return
        _checks.no_overlap("out", out, "bias", bias)
        fn = self._fn(form + "_bias", a)
        self._check(form + "_bias", fn(self._ptr(out), self._ptr(a), self._ptr(bias), *args,
                                       *out.shape))

    def form_backward(self, form: str, dh: np.ndarray, a: np.ndarray, out: np.ndarray,
                      *args: float) -> None:
        """out = da `[n, W]` from dh `[n, H]` and the forward's a, in one pass:
        expert_forms.<form>_backward bit for bit."""
        form, a, out, dh2, args = _checks.form_args(form, a, out, dh, args, C_DTYPES, "C")
        assert dh2 is not None
        fn = self._fn(form + "_backward", a)
        self._check(form + "_backward", fn(self._ptr(out), self._ptr(dh2), self._ptr(a), *args,
                                           *dh2.shape))

    # ------------------------------------------------------------ threads
    # The count is process-wide: a count set from one Python thread applies to C calls made
    # from any other (csrc/threads.c keeps it and passes it to every parallel region).

    @property
    def grouped_gemm(self):
        """The grouped GEMM the experts' filled-rows path batches its matmuls with
        (pymoe.backend.grouped_gemm), or None where NumPy's BLAS has no cblas_sgemm_batch
        (grouped_gemm_detail says why); loaded on first use."""
        from .grouped_gemm import load
        return load()[0]

    @property
    def grouped_gemm_detail(self) -> str:
        """What grouped_gemm is (its entry point and library), or why it is None."""
        from .grouped_gemm import load
        gg, why = load()
        return gg.detail if gg is not None else why

    def get_num_threads(self) -> int:
        """Threads the next C call will use, from any Python thread (1 without OpenMP)."""
        return int(self.lib.pymoe_get_max_threads())

    @property
    def max_num_threads(self) -> int:
        """The largest count set_num_threads accepts: 4 x os.cpu_count() (at least the OpenMP
        default), never above 1024 or OMP_THREAD_LIMIT. More threads than that cannot help, and
        past what the OS grants libgomp aborts the whole process instead of raising."""
        cap = max(4 * (os.cpu_count() or 1), self.default_num_threads)
        return max(1, min(cap, int(self.lib.pymoe_thread_limit()), 1024))

    def set_num_threads(self, n: int) -> None:
        """Use n OpenMP threads from now on, in every Python thread (n <= 0 restores the default).

        Raises:
            ValueError when n > max_num_threads.
        """
        n = _checks.integer("n", n)
        cap = self.max_num_threads
        # the C side checks too, but a Python int past 2**31 would not even convert to a C int
        if n > cap or self.lib.pymoe_set_num_threads(n) != 0:
            raise ValueError(f"n: expected at most {cap} threads (max_num_threads: 4 x "
                             f"os.cpu_count(), OMP_THREAD_LIMIT, 1024), or <= 0 for the "
                             f"default; got {n}")

    def num_threads(self, n: int) -> contextlib.AbstractContextManager[None]:
        """Run a block with n threads, then restore the previous count."""
        return temporarily(self.get_num_threads, self.set_num_threads, n)

    @contextlib.contextmanager
    def between_blas_calls(self) -> Iterator[None]:
        """Run the block's C calls from this OS thread on one thread (other threads keep the
        count; blocks nest). MoELayer's forward and backward run in one: their C steps sit
        between BLAS calls, and OpenMP workers left spinning after a parallel region take the
        cores from the next matmul's BLAS threads. torch's libgomp spins (pymoe's
        OMP_WAIT_POLICY=PASSIVE cannot reach a runtime loaded before it): the Mixtral-like
        forward took 151 ms with the C core's threads and 123 ms without."""
        self.lib.pymoe_one_thread_here(1)
        try:
            yield
        finally:
            self.lib.pymoe_one_thread_here(0)
