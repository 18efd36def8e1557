"""The CUDA kernels (csrc/cuda/) as a pymoe backend for arrays that live on a GPU.

Arrays are CuPy arrays (`pip install 'pymoe-routing[cuda]'`) or raw device pointers wrapped in
DeviceArray(ptr, shape, dtype). The library is loaded with cffi (ABI mode) from $PYMOE_CUDA_LIB or
pymoe/_pymoe_cuda.so, with its declarations read from the header built beside it
(csrc/cuda/build.py puts it there).

When the library is the CPU emulation (`python csrc/cuda/build.py --emulate -o PATH`, then
PYMOE_CUDA_LIB=PATH), device memory is host memory and arrays are NumPy arrays: the tests run this
same wrapper, the same host launch code and the same kernel source, on the CPU.

Each operation has the name, argument order and return value of its NumPy and C twins
(pymoe.backends: top_k, assign_slots, assign_slots_ordered, keep_by_score, dispatch, combine,
gate_grad), on device arrays; route() runs the slot rules through pymoe.slots.assign, as
pymoe.route does.

Index contents are checked on the device: the kernels treat an invalid entry (an expert, position
or slot owner out of range, a token_order that is not a permutation, a NaN score) as
dropped/empty and set a bit in the status word of (device, stream), which the library owns.
`check` chooses when that word is read:
    True     after the call (a synchronisation of the stream), raising ValueError: the default;
    "defer"  not now: bits accumulate until check_status() reads them (once per step, say);
    False    not at all: the kernels skip the bookkeeping (benchmarks).
route() reads it once for all its kernels. Float values are not checked for inf (that would cost a
pass over the data).
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from .. import _checks
from ..capacity import capacity_of
from ..memory import temporarily
from ..options import device_keywords, route_options
from ..priority import priority_order
from ..slots import assign_for
from .cdef_macros import cdef_block
from .install import PACKAGE_DIR
from .protocol import BackendInfo

FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
INT64 = np.dtype(np.int64)
FLOAT_OPS = {  # op -> (its float entry point, its double one), as csrc/cuda/pymoe_cuda.h declares
    "softmax_top_k": ("pymoe_cuda_softmax_top_k_f32", "pymoe_cuda_softmax_top_k_f64"),
    "top_k": ("pymoe_cuda_top_k_f32", "pymoe_cuda_top_k_f64"),
    "dispatch": ("pymoe_cuda_dispatch_f32", "pymoe_cuda_dispatch_f64"),
    "combine": ("pymoe_cuda_combine_f32", "pymoe_cuda_combine_f64"),
    "gate_grad": ("pymoe_cuda_gate_grad_f32", "pymoe_cuda_gate_grad_f64"),
}
Check = Union[bool, str]  # True, False or "defer" (Union: evaluated at run time on Python 3.9)



def library_path() -> str:
    return os.environ.get("PYMOE_CUDA_LIB") or os.path.join(PACKAGE_DIR, "_pymoe_cuda.so")


@dataclass(frozen=True)
class DeviceArray:
    """A raw, C-contiguous device buffer: its address, shape and dtype (nothing is copied)."""
    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype = field(default=np.dtype(np.float32))

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if not isinstance(self.ptr, int) or self.ptr < 0:
            raise TypeError(f"ptr: expected a non-negative int address, got {self.ptr!r}")

    @property
    def ndim(self) -> int:
        return len(self.shape)


class _HostMemory:
    """The emulated device: NumPy arrays in host memory."""
    name = "host memory (CPU emulation)"
    xp = np

    def is_array(self, a: Any) -> bool:
        return isinstance(a, np.ndarray)

    def ptr(self, a: np.ndarray) -> int:
        return a.ctypes.data

    def device(self, a: np.ndarray) -> int | None:
        return None  # the current device

    def stream(self) -> int:
        return 0

    def to_host(self, a: np.ndarray) -> np.ndarray:
        return a


class _CupyMemory:
    """A real device: CuPy arrays on the current stream."""
    name = "CuPy arrays"

    def __init__(self, cupy: Any) -> None:
        self.xp = cupy

    def is_array(self, a: Any) -> bool:
        return isinstance(a, self.xp.ndarray)

    def ptr(self, a: Any) -> int:
        return int(a.data.ptr)

    def device(self, a: Any) -> int | None:
        return int(a.device.id)

    def stream(self) -> int:
        return int(self.xp.cuda.get_current_stream().ptr)

    def to_host(self, a: Any) -> np.ndarray:
        return self.xp.asnumpy(a)


def load(path: str | None = None) -> tuple[CudaBackend | None, BackendInfo]:
    """The CUDA backend and its BackendInfo, or (None, why it is unavailable). Never raises."""
    path = path or library_path()
    build_hint = ("build it with `python -m pymoe.cuda_build` (nvcc) or install with "
                  "PYMOE_BUILD_CUDA=1")
    if not os.path.exists(path):
        return None, BackendInfo("cuda", False, f"the CUDA library {path} is not built; {build_hint}")
    header = os.path.splitext(path)[0] + ".h"
    try:
        import cffi
    except ImportError as err:
        return None, BackendInfo("cuda", False, f"cffi is missing: {err}")
    try:
        ffi = cffi.FFI()
        ffi.cdef(cdef_block(header))
        lib = ffi.dlopen(path)
    except (OSError, IndexError, cffi.CDefError, cffi.FFIError) as err:
        # an unreadable or malformed header, a missing marker, a file that is not a library
        return None, BackendInfo("cuda", False, f"cannot load the CUDA library {path}: {err}")
    count = ffi.new("int *")
    code = lib.pymoe_cuda_device_count(count)
    if code != 0 or count[0] < 1:
        why = (f"no usable GPU: cudaGetDeviceCount failed with "
               f"{ffi.string(lib.pymoe_cuda_error_name(code)).decode()} ({code}): "
               f"{ffi.string(lib.pymoe_cuda_error_string(code)).decode()}") if code != 0 \
            else "no CUDA device is visible"
        return None, BackendInfo("cuda", False, why)
    emulated = bool(lib.pymoe_cuda_emulated())
    if emulated:
        memory: Any = _HostMemory()
    else:
        try:
            import cupy
            memory = _CupyMemory(cupy)
        except ImportError:
            memory = None  # raw DeviceArray pointers only
    be = CudaBackend(ffi, lib, memory, emulated)
    what = (f"CPU emulation of the CUDA kernels ({count[0]} fake devices)" if emulated
            else f"CUDA kernels, {count[0]} device(s)")
    arrays = memory.name if memory is not None else "raw DeviceArray pointers (CuPy not installed)"
    return be, BackendInfo("cuda", True, f"{what}; arrays: {arrays}; library {path}")


@dataclass(frozen=True)
class DeviceRouting:
    """route() on the device: the index form of pymoe.Routing, as device arrays."""
    probs: Any  # [T, E]
    expert_index: Any  # <int64>[T, K]
    gate: Any  # [T, K], 0 where dropped
    position: Any  # <int64>[T, K], -1 where dropped
    slot_owner: Any  # <int64>[E, C]
    expert_load: Any  # <int64>[E], before dropping
    token_order: Any  # <int64>[T] (priority.priority_order)
    capacity: int


class _Deferred:
    """A CudaBackend whose calls leave the status word to be read later (check="defer"): route()
    passes it to slots.assign and reads the status once, after the last kernel."""

    def __init__(self, backend: CudaBackend) -> None:
        self._backend = backend

    def __getattr__(self, name: str) -> Any:
        return functools.partial(getattr(self._backend, name), check="defer")


class _Ptr(int):
    """An address to pass as a pointer argument (0 becomes NULL)."""


class CudaBackend:
    """Top-K, slot assignment, dispatch, combine and gate gradient on device arrays."""
    name = "cuda"

    def __init__(self, ffi: Any, lib: Any, memory: Any, emulated: bool) -> None:
        self.ffi, self.lib, self.memory, self.emulated = ffi, lib, memory, emulated
        self._local = threading.local()  # per host thread: the stream override

    def _error(self, code: int) -> str:
        return (f"{self.ffi.string(self.lib.pymoe_cuda_error_name(code)).decode()} ({code}): "
                f"{self.ffi.string(self.lib.pymoe_cuda_error_string(code)).decode()}")

    # ------------------------------------------------------------ device, stream, status
    def get_device(self) -> int:
        dev = self.ffi.new("int *")
        code = self.lib.pymoe_cuda_get_device(dev)
        if code != 0:
            raise RuntimeError(f"cudaGetDevice failed: {self._error(code)}")
        return int(dev[0])

    @contextlib.contextmanager
    def device(self, index: int) -> Iterator[None]:
        """Make device `index` current on this host thread (the emulator has two fake ones)."""
        index = _checks.integer("device", index, low=0)
        before = self.get_device()
        code = self.lib.pymoe_cuda_set_device(index)
        if code != 0:
            raise ValueError(f"device: cannot select device {index}: {self._error(code)}")
        try:
            yield
        finally:
            self.lib.pymoe_cuda_set_device(before)

    @contextlib.contextmanager
    def stream(self, handle: int) -> Iterator[None]:
        """Launch on the cudaStream_t `handle` (an int address) on this host thread, instead of
        the array library's current stream (CuPy's) or the default stream."""
        handle = _checks.integer("handle", handle, low=0)
        before = getattr(self._local, "stream", None)
        self._local.stream = handle
        try:
            yield
        finally:
            self._local.stream = before

    def _stream(self) -> Any:
        handle = getattr(self._local, "stream", None)
        if handle is None:
            handle = self.memory.stream() if self.memory else 0
        return self.ffi.cast("void *", handle)

    def check_status(self) -> None:
        """Read the status word of (current device, current stream) and raise ValueError naming
        every kind of bad input a kernel met since it was last read; then it is zero again."""
        self._take_status("check_status", self._stream())

    def _take_status(self, what: str, stream: Any) -> None:
        bits = self.ffi.new("int *")
        code = self.lib.pymoe_cuda_status_take(bits, stream)
        if code != 0:
            raise RuntimeError(f"{what}: reading the status failed: {self._error(code)}")
        if bits[0]:  # each bit stands for a C error code: the C core's message for it
            raise ValueError(f"{what}: " + "; ".join(
                self.ffi.string(self.lib.pymoe_cuda_error_string(
                    self.lib.pymoe_cuda_status_code(1 << i))).decode()
                for i in range(31) if bits[0] >> i & 1))

    def _call(self, func: str, arrays: list, *args: Any, check: Check = True) -> None:
        """Call lib.func(*args, status, stream) on the device of `arrays`; raise on an error code
        and, with check=True, on any status bit the call set."""
        if check not in (True, False, "defer"):
            raise ValueError(f"check: expected True, False or 'defer', got {check!r}")
        devices = {d for d in (self.memory.device(a) if self.memory and not isinstance(
            a, DeviceArray) else None for a in arrays if a is not None) if d is not None}
        if len(devices) > 1:
            raise ValueError(f"{func}: the arrays live on different devices {sorted(devices)}")
        stack = contextlib.ExitStack()
        with stack:
            if devices and devices != {self.get_device()}:
                stack.enter_context(self.device(devices.pop()))
            stream = self._stream()
            status = self.ffi.NULL
            if check:
                slot = self.ffi.new("int **")
                code = self.lib.pymoe_cuda_status(slot, stream)
                if code != 0:
                    raise RuntimeError(f"{func}: no status word: {self._error(code)}")
                status = slot[0]
            cargs = [self.ffi.cast("void *", a) if isinstance(a, _Ptr) else a for a in args]
            code = getattr(self.lib, func)(*cargs, status, stream)
            if code != 0:
                raise (ValueError if code < 0 else RuntimeError)(f"{func}: {self._error(code)}")
            if check is True:
                self._take_status(func, stream)

    # ------------------------------------------------------------ arguments
    def _arg(self, name: str, a: Any, shape: tuple, dtypes: tuple) -> tuple[Any, int]:
        """(array, address) after checking kind, dtype, shape and contiguity. A non-contiguous
        array is copied: the caller must hold the returned array until the kernel has run."""
        if isinstance(a, DeviceArray):
            dtype = a.dtype
        elif self.memory is not None and self.memory.is_array(a):
            dtype = np.dtype(a.dtype)
        else:
            kinds = "a CuPy array or a DeviceArray" if not self.emulated else \
                "a NumPy array (the emulated device's memory) or a DeviceArray"
            raise TypeError(f"{name}: expected {kinds}, got {type(a).__module__}."
                            f"{type(a).__name__}")
        if dtype not in dtypes:
            raise TypeError(f"{name}: expected dtype {' or '.join(d.name for d in dtypes)}, "
                            f"got {dtype}")
        _checks.check_shape(name, a, shape)
        if isinstance(a, DeviceArray):
            if a.ptr == 0 and int(np.prod(a.shape)) > 0:  # the library would only say NULL
                raise ValueError(f"{name}: got a NULL device pointer (DeviceArray.ptr == 0) for "
                                 f"a non-empty array of shape {a.shape}")
            return a, a.ptr
        if not a.flags.c_contiguous:
            a = self.memory.xp.ascontiguousarray(a)
        return a, self.memory.ptr(a)

    def _out(self, name: str, out: Any, shape: tuple, dtype: np.dtype) -> tuple[Any, int]:
        if out is None:
            if self.memory is None:
                raise TypeError(f"{name}: required when CuPy is not installed (pass a DeviceArray)")
            out = self.memory.xp.empty(shape, dtype)
        arr, ptr = self._arg(name, out, shape, (np.dtype(dtype),))
        if arr is not out:
            raise ValueError(f"{name}: expected a C-contiguous array to write into")
        return arr, ptr

    def _optional(self, name: str, a: Any, shape: tuple, dtype: np.dtype) -> tuple[Any, int]:
        return (None, 0) if a is None else self._arg(name, a, shape, (dtype,))

    @staticmethod
    def _name(op: str, dtype: np.dtype) -> str:
        """The entry point of `op` for `dtype` (FLOAT_OPS names each one, as pymoe_cuda.h)."""
        return FLOAT_OPS[op][0 if dtype == np.float32 else 1]

    # ------------------------------------------------------------ block size
    def get_block_size(self) -> int:
        return int(self.lib.pymoe_cuda_get_block_size())

    def set_block_size(self, threads: int) -> None:
        """Threads per block for every kernel this host thread launches: a power of two in
        [32, 1024] (default 256). Other threads keep their own setting."""
        threads = _checks.integer("threads", threads)
        if self.lib.pymoe_cuda_set_block_size(threads) != 0:
            raise ValueError(f"threads: expected a power of two in [32, 1024], got {threads}")

    def block_size(self, threads: int) -> contextlib.AbstractContextManager[None]:
        """Run a block with `threads` threads per block, then restore the previous size."""
        return temporarily(self.get_block_size, self.set_block_size, threads)

    # ------------------------------------------------------------ operations
    def softmax_top_k(self, router_logits: Any, k: int, normalize: bool = False, *,
                      out: tuple | None = None, check: Check = True) -> tuple[Any, Any, Any]:
        """Steps 2-4 of pymoe.route in one kernel: (probs `[T, E]`, expert_index `<int64>[T, K]`,
        gate `[T, K]`) as router.softmax, topk.top_k and topk.gates compute them, before any
        capacity drop. out: the three arrays to write (required with raw pointers, no CuPy)."""
        logits, p_logits = self._arg("router_logits", router_logits, (None, None), FLOATS)
        T, E = logits.shape
        k = _checks.integer("k", k, low=1, high=max(E, 1))
        normalize = _checks.boolean("normalize", normalize)
        dt = np.dtype(logits.dtype)
        o_probs, o_index, o_gate = out if out is not None else (None, None, None)
        probs, p_probs = self._out("probs", o_probs, (T, E), dt)
        index, p_index = self._out("expert_index", o_index, (T, k), INT64)
        gate, p_gate = self._out("gate", o_gate, (T, k), dt)
        self._call(self._name("softmax_top_k", dt), [logits, probs, index, gate],
                   _Ptr(p_probs), _Ptr(p_index), _Ptr(p_gate), _Ptr(p_logits), T, k, E,
                   int(normalize), check=check)
        return probs, index, gate

    def top_k(self, score: Any, k: int, bias: Any = None, probs: Any = None, *,
              out: tuple | None = None, check: Check = True) -> tuple[Any, Any, Any]:
        """(expert_index `<int64>[T, K]` of score + bias (topk.top_k), expert_load `<int64>[E]`,
        probs.sum(axis=0) `[E]` or None without probs), as the C backend's top_k."""
        score, p_score = self._arg("score", score, (None, None), FLOATS)
        T, E = score.shape
        k = _checks.integer("k", k, low=1, high=max(E, 1))
        dt = np.dtype(score.dtype)
        bias, p_bias = self._optional("bias", bias, (E,), dt)
        probs, p_probs = self._optional("probs", probs, (T, E), dt)
        o_index, o_load, o_sum = out if out is not None else (None, None, None)
        index, p_index = self._out("expert_index", o_index, (T, k), INT64)
        load, p_load = self._out("expert_load", o_load, (E,), INT64)
        psum, p_sum = self._out("prob_sum", o_sum, (E,), dt) if probs is not None else (None, 0)
        self._call(self._name("top_k", dt), [score, bias, probs, index],
                   _Ptr(p_index), _Ptr(p_load), _Ptr(p_sum), _Ptr(p_score), _Ptr(p_bias),
                   _Ptr(p_probs), T, k, E, check=check)
        return index, load, psum

    def _slot_outputs(self, out: tuple | None, T: int, K: int, E: int, C: int) -> list:
        """[(position, ptr), (slot_owner, ptr), (expert_load, ptr)] from out or fresh arrays."""
        o_pos, o_owner, o_load = out if out is not None else (None, None, None)
        return [self._out("position", o_pos, (T, K), INT64),
                self._out("slot_owner", o_owner, (E, C), INT64),
                self._out("expert_load", o_load, (E,), INT64)]

    def _pairs_in_order(self, expert_index: Any, order: Any, num_experts: int,
                        capacity: int) -> tuple:
        """expert_index `<int64>[T, K]`, order `<int64>[N]` (N <= T*K), E and C, checked for
        kind, shape and size (the entries are checked on the device), with their addresses."""
        E = _checks.integer("num_experts", num_experts, low=1)
        C = _checks.integer("capacity", capacity, low=0)
        index = self._arg("expert_index", expert_index, (None, None), (INT64,))
        pairs = self._arg("order", order, (None,), (INT64,))
        if pairs[0].shape[0] > index[0].size:
            raise ValueError(f"order: expected at most T*K = {index[0].size} distinct pair ids, "
                             f"got {pairs[0].shape[0]}")
        return index, pairs, E, C

    def assign_slots(self, expert_index: Any, token_order: Any, num_experts: int,
                     capacity: int, *, out: tuple | None = None,
                     check: Check = True) -> tuple[Any, Any, Any]:
        """(position `<int64>[T, K]`, slot_owner `<int64>[E, C]`, expert_load `<int64>[E]`), the
        integers of the NumPy and C assign_slots (choice-major priority) for any token_order
        (None: 0..T-1). out: the three arrays to write (required with raw pointers, no CuPy)."""
        E = _checks.integer("num_experts", num_experts, low=1)
        C = _checks.integer("capacity", capacity, low=0)
        index, p_index = self._arg("expert_index", expert_index, (None, None), (INT64,))
        T, K = index.shape
        order, p_order = self._optional("token_order", token_order, (T,), INT64)
        (position, p_pos), (owner, p_owner), (load, p_load) = self._slot_outputs(out, T, K, E, C)
        self._call("pymoe_cuda_assign_slots", [index, order, position], _Ptr(p_pos),
                   _Ptr(p_owner), _Ptr(p_load), _Ptr(p_index), _Ptr(p_order), T, K, E, C,
                   check=check)
        return position, owner, load

    def assign_slots_ordered(self, expert_index: Any, order: Any, num_experts: int,
                             capacity: int, *, out: tuple | None = None,
                             check: Check = True) -> tuple[Any, Any, Any]:
        """(position, slot_owner, expert_load) with the pairs of `order` `<int64>[N]` (distinct
        flat ids t*K + j) claiming slots in that order; unlisted pairs get -1
        (slots.assign_slots_ordered, C's pymoe_assign_slots_ordered)."""
        (index, p_index), (pairs, p_pairs), E, C = self._pairs_in_order(expert_index, order,
                                                                        num_experts, capacity)
        T, K = index.shape
        (position, p_pos), (owner, p_owner), (load, p_load) = self._slot_outputs(out, T, K, E, C)
        self._call("pymoe_cuda_assign_slots_ordered", [index, pairs, position], _Ptr(p_pos),
                   _Ptr(p_owner), _Ptr(p_load), _Ptr(p_index), _Ptr(p_pairs), pairs.shape[0],
                   T, K, E, C, check=check)
        return position, owner, load

    def keep_by_score(self, expert_index: Any, order: Any, score: Any, num_experts: int,
                      capacity: int, *, out: Any = None, check: Check = True) -> Any:
        """keep `<bool>[T, K]`: each expert's C best-scoring pairs of `order`, ties to the earlier
        pair (capacity.keep_by_score, C's pymoe_keep_by_score). score `[T, K]` is compared in
        float64, as in C (a float32 score converts exactly; with raw pointers it must be float64).
        out: a `<uint8>[T, K]` array to write (required with raw pointers, no CuPy)."""
        (index, p_index), (pairs, p_pairs), E, C = self._pairs_in_order(expert_index, order,
                                                                        num_experts, capacity)
        T, K = index.shape
        score, p_score = self._arg("score", score, (T, K), FLOATS)
        if np.dtype(score.dtype) != np.float64:
            if self.memory is None:
                raise TypeError("score: expected float64 with raw pointers (no CuPy to cast)")
            score = score.astype(np.float64)
            p_score = self.memory.ptr(score)
        keep, p_keep = self._out("keep", out, (T, K), np.dtype(np.uint8))
        self._call("pymoe_cuda_keep_by_score", [index, pairs, score, keep], _Ptr(p_keep),
                   _Ptr(p_index), _Ptr(p_pairs), _Ptr(p_score), pairs.shape[0], T, K, E, C,
                   check=check)
        return keep if isinstance(keep, DeviceArray) else keep.view(np.bool_)

    def dispatch(self, x: Any, slot_owner: Any, k: int, weight: Any = None, *,
                 out: Any = None, check: Check = True) -> Any:
        """expert_in `[E, C, D]` (pymoe.indexed.dispatch_indexed)."""
        x, p_x = self._arg("x", x, (None, None), FLOATS)
        T, D = x.shape
        k = _checks.integer("k", k, low=1)
        owner, p_owner = self._arg("slot_owner", slot_owner, (None, None), (INT64,))
        E, C = owner.shape
        dt = np.dtype(x.dtype)
        weight, p_w = self._optional("weight", weight, (T, k), dt)
        out, p_out = self._out("out", out, (E, C, D), dt)
        self._call(self._name("dispatch", dt), [x, owner, weight, out],
                   _Ptr(p_out), _Ptr(p_x), _Ptr(p_owner), _Ptr(p_w), T, k, E, C, D, check=check)
        return out

    def _pairs(self, expert_out: Any, expert_index: Any, position: Any) -> list:
        """[(expert_out, ptr), (expert_index, ptr), (position, ptr)]: the arrays are returned
        with their addresses so that contiguous copies stay alive until the kernel has run."""
        eo = self._arg("expert_out", expert_out, (None, None, None), FLOATS)
        index = self._arg("expert_index", expert_index, (None, None), (INT64,))
        return [eo, index, self._arg("position", position, tuple(index[0].shape), (INT64,))]

    def _pair_sizes(self, expert_out: Any, expert_index: Any, position: Any) -> tuple:
        """_pairs plus the sizes (T, K, E, C, D) and the float dtype they imply."""
        eo, index, pos = self._pairs(expert_out, expert_index, position)
        E, C, D = eo[0].shape
        T, K = index[0].shape
        return eo, index, pos, (T, K, E, C, D), np.dtype(eo[0].dtype)

    def combine(self, expert_out: Any, expert_index: Any, position: Any, weight: Any = None, *,
                out: Any = None, check: Check = True) -> Any:
        """y `[T, D]` (pymoe.indexed.combine_indexed)."""
        (eo, p_eo), (index, p_index), (pos, p_pos), (T, K, E, C, D), dt = self._pair_sizes(
            expert_out, expert_index, position)
        weight, p_w = self._optional("weight", weight, (T, K), dt)
        y, p_y = self._out("out", out, (T, D), dt)
        self._call(self._name("combine", dt), [eo, index, pos, weight, y],
                   _Ptr(p_y), _Ptr(p_eo), _Ptr(p_index), _Ptr(p_pos), _Ptr(p_w), T, K, E, C, D,
                   check=check)
        return y

    def gate_grad(self, dy: Any, expert_out: Any, expert_index: Any, position: Any, *,
                  out: Any = None, check: Check = True) -> Any:
        """dgate `[T, K]` (pymoe.indexed.gate_grad_indexed)."""
        (eo, p_eo), (index, p_index), (pos, p_pos), (T, K, E, C, D), dt = self._pair_sizes(
            expert_out, expert_index, position)
        dy, p_dy = self._arg("dy", dy, (T, D), (dt,))
        g, p_g = self._out("out", out, (T, K), dt)
        self._call(self._name("gate_grad", dt), [dy, eo, index, pos, g],
                   _Ptr(p_g), _Ptr(p_dy), _Ptr(p_eo), _Ptr(p_index), _Ptr(p_pos), T, K, E, C, D,
                   check=check)
        return g

    def route(self, router_logits: Any, k: int, capacity_factor: float | None = 1.25, *,
              seed: int | None = None, **keywords: Any) -> DeviceRouting:
        """pymoe.route's index form on the device, by route()'s own steps (pymoe.routing) with
        this backend's twins: softmax_top_k (steps 2-4), priority.priority_order (6), slots.assign
        (5-9) and capacity.capacity_of (8). The keywords are route()'s (pymoe.options), those
        the device path runs (options.device_keywords()); seed: an int, for priority="random"
        (numpy's default_rng(seed), the permutation copied to the device).
        The status word is read once, after the last kernel (one synchronisation per route)."""
        if self.memory is None:
            raise TypeError("route: needs CuPy to allocate its outputs (pip install 'pymoe-routing[cuda]')")
        logits, _ = self._arg("router_logits", router_logits, (None, None), FLOATS)
        T, E = logits.shape
        on_device = device_keywords()
        for name in keywords:
            if name not in on_device:
                raise TypeError(f"route() got an unexpected keyword argument {name!r} (the device "
                                f"route runs {', '.join(on_device)})")
        opts = route_options(max(E, 1), k, capacity_factor, **keywords)
        rng = None if seed is None else np.random.default_rng(_checks.integer("seed", seed))
        xp = self.memory.xp
        probs, index, gate = self.softmax_top_k(logits, opts.k, opts.normalize, check="defer")
        tokens = priority_order(probs, opts.priority, rng, xp)  # [T]                       step 6

        def slots(C: int) -> tuple[Any, Any, Any]:  # steps 5-9: route()'s one slot function
            return assign_for(_Deferred(self), index, tokens, E, C, opts, score=gate, xp=xp)

        if opts.capacity_factor is None:  # dropless: the largest load, known after counting
            position, owner, load = slots(T)
            self.check_status()
            C = capacity_of(T, E, opts, self.memory.to_host(load))
            owner = xp.ascontiguousarray(owner[:, :C]) if C <= T else owner
        else:
            C = capacity_of(T, E, opts)
            position, owner, load = slots(C)
            self.check_status()
        gate = xp.where(position >= 0, gate, 0).astype(gate.dtype)
        return DeviceRouting(probs, index, gate, position, owner, load, tokens, C)
