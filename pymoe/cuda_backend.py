"""The CUDA kernels (csrc/cuda/) as a pymoe backend for arrays that live on a GPU.

Arrays are CuPy arrays (`pip install 'pymoe[cuda]'`) or raw device pointers wrapped in
DeviceArray(ptr, shape, dtype). The library is loaded with cffi (ABI mode) from $PYMOE_CUDA_LIB or
pymoe/_pymoe_cuda.so, with its declarations read from the header built beside it
(csrc/cuda/build.py puts it there).

When the library is the CPU emulation (`python csrc/cuda/build.py --emulate -o PATH`, then
PYMOE_CUDA_LIB=PATH), device memory is host memory and arrays are NumPy arrays: the tests run this
same wrapper, the same host launch code and the same kernel source, on the CPU.

Index contents are checked on the device: the kernels treat an invalid entry as dropped/empty and
set a bit in a status word owned by the library, which this wrapper reads back after the call (a
synchronisation) and turns into a ValueError; pass check=False to skip that (benchmarks do). A
token order is copied to the host and checked to be a permutation. This holds for CuPy arrays and
raw pointers alike. Float values are not checked for NaN/inf (that would cost a pass over the
data).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from . import _checks
from .backend_api import BackendInfo
from .capacity import expert_capacity

FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
INT64 = np.dtype(np.int64)
_BAD_BITS = {1: "an expert_index entry is outside [0, E)",
             2: "a position entry is outside [-1, C)",
             4: "a slot_owner entry is outside [-1, T*K)",
             8: "a token_order entry is outside [0, T)"}


def library_path() -> str:
    return os.environ.get("PYMOE_CUDA_LIB") or os.path.join(os.path.dirname(__file__),
                                                             "_pymoe_cuda.so")


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


class _HostMemory:
    """The emulated device: NumPy arrays in host memory."""
    name = "host memory (CPU emulation)"
    xp = np

    def is_array(self, a: Any) -> bool:
        return isinstance(a, np.ndarray)

    def ptr(self, a: np.ndarray) -> int:
        return a.ctypes.data

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

    def stream(self) -> int:
        return int(self.xp.cuda.get_current_stream().ptr)

    def to_host(self, a: Any) -> np.ndarray:
        return self.xp.asnumpy(a)


def _declarations(header: str) -> str:
    with open(header, encoding="utf-8") as f:
        return f.read().split("/* cdef-begin */", 1)[1].split("/* cdef-end */", 1)[0]


def load(path: str | None = None) -> tuple[CudaBackend | None, BackendInfo]:
    """The CUDA backend and its BackendInfo, or (None, why it is unavailable). Never raises."""
    path = path or library_path()
    build_hint = ("build it with `python csrc/cuda/build.py` (nvcc) or install with "
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
        ffi.cdef(_declarations(header))
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
    what = "CPU emulation of the CUDA kernels" if emulated else f"CUDA kernels, {count[0]} device(s)"
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
    token_order: Any  # <int64>[T] or None (choice priority)
    capacity: int


class CudaBackend:
    """Router, slot assignment, dispatch, combine and gate gradient on device arrays."""
    name = "cuda"

    def __init__(self, ffi: Any, lib: Any, memory: Any, emulated: bool) -> None:
        self.ffi, self.lib, self.memory, self.emulated = ffi, lib, memory, emulated
        slot = ffi.new("int **")
        code = lib.pymoe_cuda_status_new(slot)
        if code != 0:
            raise RuntimeError(f"cannot allocate the device status word: {self._error(code)}")
        self._status = slot[0]  # device int the kernels OR their PYMOE_BAD_* bits into

    def __del__(self) -> None:
        status = getattr(self, "_status", None)
        if status is not None:
            self.lib.pymoe_cuda_status_free(status)

    def _error(self, code: int) -> str:
        return (f"{self.ffi.string(self.lib.pymoe_cuda_error_name(code)).decode()} ({code}): "
                f"{self.ffi.string(self.lib.pymoe_cuda_error_string(code)).decode()}")

    def _stream(self) -> Any:
        return self.ffi.cast("void *", self.memory.stream() if self.memory else 0)

    def _to_host(self, name: str, a: Any, ptr: int) -> np.ndarray:
        """A small device array copied to the host (numpy), for checks made there."""
        if not isinstance(a, DeviceArray):
            return np.asarray(self.memory.to_host(a))
        host = np.empty(a.shape, a.dtype)
        code = self.lib.pymoe_cuda_copy_to_host(self.ffi.cast("void *", host.ctypes.data),
                                                self.ffi.cast("void *", ptr), host.nbytes,
                                                self._stream())
        if code != 0:
            raise RuntimeError(f"{name}: copying to the host failed: {self._error(code)}")
        return host

    # ------------------------------------------------------------ plumbing
    def _arg(self, name: str, a: Any, shape: tuple, dtypes: tuple) -> tuple[Any, int]:
        """(array, address) after checking kind, dtype, shape and contiguity. A non-contiguous
        array is copied: the caller must hold the returned array until the kernel has run."""
        if isinstance(a, DeviceArray):
            arr, dtype, got_shape = a, a.dtype, a.shape
        elif self.memory is not None and self.memory.is_array(a):
            arr, dtype, got_shape = a, np.dtype(a.dtype), tuple(a.shape)
        else:
            kinds = "a CuPy array or a DeviceArray" if not self.emulated else \
                "a NumPy array (the emulated device's memory) or a DeviceArray"
            raise TypeError(f"{name}: expected {kinds}, got {type(a).__module__}."
                            f"{type(a).__name__}")
        if dtype not in dtypes:
            raise TypeError(f"{name}: expected dtype {' or '.join(d.name for d in dtypes)}, "
                            f"got {dtype}")
        if len(got_shape) != len(shape) or any(s is not None and s != g
                                               for s, g in zip(shape, got_shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name}: expected shape {want}, got {got_shape}")
        if isinstance(arr, DeviceArray):
            if arr.ptr == 0 and int(np.prod(got_shape)) > 0:  # the library would only say NULL
                raise ValueError(f"{name}: got a NULL device pointer (DeviceArray.ptr == 0) for "
                                 f"a non-empty array of shape {got_shape}")
            return arr, arr.ptr
        if not arr.flags.c_contiguous:
            arr = self.memory.xp.ascontiguousarray(arr)
        return arr, self.memory.ptr(arr)

    def _out(self, name: str, out: Any, shape: tuple, dtype: np.dtype) -> tuple[Any, int]:
        if out is None:
            if self.memory is None:
                raise TypeError(f"{name}: required when CuPy is not installed (pass a DeviceArray)")
            out = self.memory.xp.empty(shape, dtype)
        arr, ptr = self._arg(name, out, shape, (np.dtype(dtype),))
        if arr is not out:
            raise ValueError(f"{name}: expected a C-contiguous array to write into")
        return arr, ptr

    def _call(self, func: str, *args: Any, check: bool = True) -> None:
        """Call lib.func; raise on an error code, and (check=True) on any status bit it set."""
        status = self._status if check else self.ffi.NULL
        stream = self._stream()
        cargs = [self.ffi.cast("void *", a) if isinstance(a, _Ptr) else a for a in args]
        code = getattr(self.lib, func)(*cargs, status, stream)
        if code != 0:
            raise (ValueError if code < 0 else RuntimeError)(f"{func}: {self._error(code)}")
        if check:
            bits = self.ffi.new("int *")
            code = self.lib.pymoe_cuda_status_take(self._status, bits, stream)
            if code != 0:
                raise RuntimeError(f"{func}: reading the status failed: {self._error(code)}")
            if bits[0]:
                raise ValueError(f"{func}: " + "; ".join(m for b, m in _BAD_BITS.items()
                                                         if bits[0] & b))

    @staticmethod
    def _suffix(dtype: np.dtype) -> str:
        return "f32" if dtype == np.float32 else "f64"

    # ------------------------------------------------------------ block size
    def get_block_size(self) -> int:
        return int(self.lib.pymoe_cuda_get_block_size())

    def set_block_size(self, threads: int) -> None:
        """Threads per block for every kernel: a power of two in [32, 1024] (default 256)."""
        threads = _checks.integer("threads", threads)
        if self.lib.pymoe_cuda_set_block_size(threads) != 0:
            raise ValueError(f"threads: expected a power of two in [32, 1024], got {threads}")

    @contextlib.contextmanager
    def block_size(self, threads: int) -> Iterator[None]:
        before = self.get_block_size()
        self.set_block_size(threads)
        try:
            yield
        finally:
            self.set_block_size(before)

    # ------------------------------------------------------------ operations
    def router(self, router_logits: Any, k: int, normalize: bool = False, *,
               out: tuple | None = None, check: bool = True) -> tuple[Any, Any, Any]:
        """(probs `[T, E]`, expert_index `<int64>[T, K]`, gate `[T, K]`), as pymoe.route computes
        them before any capacity drop (topk.top_k, topk.gates). out: the three arrays to write
        (required with raw pointers and no CuPy)."""
        logits, p_logits = self._arg("router_logits", router_logits, (None, None), FLOATS)
        T, E = logits.shape
        k = _checks.integer("k", k, low=1, high=max(E, 1))
        normalize = _checks.boolean("normalize", normalize)
        dt = np.dtype(logits.dtype)
        o_probs, o_index, o_gate = out if out is not None else (None, None, None)
        probs, p_probs = self._out("probs", o_probs, (T, E), dt)
        index, p_index = self._out("expert_index", o_index, (T, k), INT64)
        gate, p_gate = self._out("gate", o_gate, (T, k), dt)
        self._call(f"pymoe_cuda_router_{self._suffix(dt)}", _Ptr(p_probs), _Ptr(p_index),
                   _Ptr(p_gate), _Ptr(p_logits), T, E, k, int(normalize), check=check)
        return probs, index, gate

    def assign_slots(self, expert_index: Any, token_order: Any, num_experts: int,
                     capacity: int, *, out: tuple | None = None,
                     check: bool = True) -> tuple[Any, Any, Any]:
        """(position `<int64>[T, K]`, slot_owner `<int64>[E, C]`, expert_load `<int64>[E]`):
        the integers of pymoe.priority.position_in_expert + capacity.drop. out: the three
        arrays to write (required with raw pointers and no CuPy)."""
        E = _checks.integer("num_experts", num_experts, low=1)
        C = _checks.integer("capacity", capacity, low=0)
        index, p_index = self._arg("expert_index", expert_index, (None, None), (INT64,))
        T, K = index.shape
        order, p_order = None, 0
        if token_order is not None:
            order, p_order = self._arg("token_order", token_order, (T,), (INT64,))
            if check and T and not np.array_equal(np.sort(self._to_host("token_order", order,
                                                                        p_order)), np.arange(T)):
                raise ValueError(f"token_order: expected a permutation of 0..{T - 1}")
        o_pos, o_owner, o_load = out if out is not None else (None, None, None)
        position, p_pos = self._out("position", o_pos, (T, K), INT64)
        owner, p_owner = self._out("slot_owner", o_owner, (E, C), INT64)
        load, p_load = self._out("expert_load", o_load, (E,), INT64)
        self._call("pymoe_cuda_assign_slots", _Ptr(p_pos), _Ptr(p_owner), _Ptr(p_load),
                   _Ptr(p_index), _Ptr(p_order), T, K, E, C, check=check)
        return position, owner, load

    def dispatch(self, x: Any, slot_owner: Any, k: int, weight: Any = None, *,
                 out: Any = None, check: bool = True) -> Any:
        """expert_in `[E, C, D]` (pymoe.indexed.dispatch_indexed)."""
        x, p_x = self._arg("x", x, (None, None), FLOATS)
        T, D = x.shape
        k = _checks.integer("k", k, low=1)
        owner, p_owner = self._arg("slot_owner", slot_owner, (None, None), (INT64,))
        E, C = owner.shape
        dt = np.dtype(x.dtype)
        weight, p_w = self._weight(weight, (T, k), dt)
        out, p_out = self._out("out", out, (E, C, D), dt)
        self._call(f"pymoe_cuda_dispatch_{self._suffix(dt)}", _Ptr(p_out), _Ptr(p_x), _Ptr(p_w),
                   _Ptr(p_owner), T, k, E, C, D, check=check)
        return out

    def _pairs(self, expert_out: Any, expert_index: Any, position: Any) -> list:
        """[(expert_out, ptr), (expert_index, ptr), (position, ptr)]: the arrays are returned
        with their addresses so that contiguous copies stay alive until the kernel has run."""
        eo = self._arg("expert_out", expert_out, (None, None, None), FLOATS)
        index = self._arg("expert_index", expert_index, (None, None), (INT64,))
        return [eo, index, self._arg("position", position, tuple(index[0].shape), (INT64,))]

    def _weight(self, weight: Any, shape: tuple, dtype: np.dtype) -> tuple[Any, int]:
        return (None, 0) if weight is None else self._arg("weight", weight, shape, (dtype,))

    def combine(self, expert_out: Any, expert_index: Any, position: Any, weight: Any = None, *,
                out: Any = None, check: bool = True) -> Any:
        """y `[T, D]` (pymoe.indexed.combine_indexed)."""
        (eo, p_eo), (index, p_index), (pos, p_pos) = self._pairs(expert_out, expert_index,
                                                                 position)
        E, C, D = eo.shape
        T, K = index.shape
        dt = np.dtype(eo.dtype)
        weight, p_w = self._weight(weight, (T, K), dt)
        y, p_y = self._out("out", out, (T, D), dt)
        self._call(f"pymoe_cuda_combine_{self._suffix(dt)}", _Ptr(p_y), _Ptr(p_eo), _Ptr(p_w),
                   _Ptr(p_index), _Ptr(p_pos), T, K, E, C, D, check=check)
        return y

    def gate_grad(self, dy: Any, expert_out: Any, expert_index: Any, position: Any, *,
                  out: Any = None, check: bool = True) -> Any:
        """dgate `[T, K]` (pymoe.indexed.gate_grad_indexed)."""
        (eo, p_eo), (index, p_index), (pos, p_pos) = self._pairs(expert_out, expert_index,
                                                                 position)
        E, C, D = eo.shape
        T, K = index.shape
        dt = np.dtype(eo.dtype)
        dy, p_dy = self._arg("dy", dy, (T, D), (dt,))
        g, p_g = self._out("out", out, (T, K), dt)
        self._call(f"pymoe_cuda_gate_grad_{self._suffix(dt)}", _Ptr(p_g), _Ptr(p_dy), _Ptr(p_eo),
                   _Ptr(p_index), _Ptr(p_pos), T, K, E, C, D, check=check)
        return g

    def route(self, router_logits: Any, k: int, capacity_factor: float | None = 1.25, *,
              min_capacity: int = 0, normalize: bool = False,
              priority: str = "choice") -> DeviceRouting:
        """pymoe.route's index form on the device: router kernel, priority, slots, capacity."""
        if self.memory is None:
            raise TypeError("route: needs CuPy to allocate its outputs (pip install 'pymoe[cuda]')")
        capacity_factor = _checks.positive_finite("capacity_factor", capacity_factor,
                                                  allow_none=True)
        min_capacity = _checks.integer("min_capacity", min_capacity, low=0)
        priority = _checks.choice("priority", priority, ("choice", "score"))
        xp = self.memory.xp
        probs, index, gate = self.router(router_logits, k, normalize)
        T, E = probs.shape
        order = None
        if priority == "score":  # batch-prioritised routing, as pymoe.priority.priority_order
            top1 = -probs.max(axis=1) if T else xp.zeros(0, probs.dtype)
            order = (xp.argsort(top1, kind="stable") if xp is np else xp.argsort(top1))
            order = order.astype(np.int64)
        if capacity_factor is None:  # dropless: the largest load, known after counting
            position, owner, load = self.assign_slots(index, order, E, T)
            C = expert_capacity(T, E, k, None, min_capacity, self.memory.to_host(load))
            owner = xp.ascontiguousarray(owner[:, :C]) if C <= T else owner
        else:
            C = expert_capacity(T, E, k, capacity_factor, min_capacity)
            position, owner, load = self.assign_slots(index, order, E, C)
        gate = xp.where(position >= 0, gate, 0).astype(gate.dtype)
        return DeviceRouting(probs, index, gate, position, owner, load, order, C)


class _Ptr(int):
    """An address to pass as a pointer argument (0 becomes NULL)."""
