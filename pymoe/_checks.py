"""Argument checks shared by every public function.

Each check raises TypeError (wrong kind of thing) or ValueError (right kind, wrong value) with a
message that names the argument and says what was expected and what was given. Nothing invalid is
allowed to reach the NumPy, C or CUDA code.
"""
from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from types import FrameType
from typing import Any

import numpy as np

from . import memory
from .expert_forms import EXPERT_FORMS

FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def _shape_str(shape: Sequence[object]) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def _any_size(s: object) -> bool:
    """A shape entry that matches any size: None, or a dimension's name from the legend ("T")."""
    return s is None or isinstance(s, str)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """warnings.warn, attributed to the first caller outside pymoe (route() may be reached through
    a preset wrapper, MoELayer or compare(): the user's line is what the warning should name)."""
    level = 2  # warn's caller
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)


def float_array(name: str, a: object, *, ndim: int | None = None, min_ndim: int | None = None,
                shape: Sequence[int | str | None] | None = None, finite: bool = True) -> np.ndarray:
    """Return `a` as a floating ndarray after checking kind, rank, shape and finiteness.

    `shape` may hold None or a dimension's name ("T") for "any size" in that axis. Integer, bool
    and complex data raise TypeError: silently casting them would hide a caller's bug (an index
    array passed as x).
    """
    if not isinstance(a, (np.ndarray, np.generic, list, tuple, numbers.Number)):
        raise TypeError(f"{name}: expected a floating-point numpy array, got {type(a).__name__}")
    arr = np.asarray(a)
    if arr.dtype.type not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float16, float32 or float64, got {arr.dtype}")
    arr = native(arr)
    if ndim is not None and arr.ndim != ndim:
        want = _shape_str(shape) if shape is not None else f"{ndim}-D"
        raise ValueError(f"{name}: expected a {ndim}-D array {want}, got shape {arr.shape}")
    if min_ndim is not None and arr.ndim < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimension(s), got shape {arr.shape}")
    if shape is not None:
        check_shape(name, arr, shape)
    if finite and arr.size and not np.isfinite(arr).all():
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        entries = "entry" if bad == 1 else "entries"
        raise ValueError(f"{name}: expected finite values, got {bad} NaN/inf {entries}")
    return arr


def native(arr: np.ndarray) -> np.ndarray:
    """`arr` in native byte order (a converted copy when it is not): C reads raw bytes."""
    return arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))


def check_shape(name: str, arr: np.ndarray, shape: Sequence[int | str | None]) -> None:
    """Raise ValueError unless arr.shape matches `shape` (None or a name matches any size)."""
    ok = arr.ndim == len(shape) and all(_any_size(s) or s == g for s, g in zip(shape, arr.shape))
    if not ok:
        want = _shape_str(shape)
        raise ValueError(f"{name}: expected shape {want}, got {tuple(arr.shape)}")


def index_array(name: str, a: object, *, shape: Sequence[int | None], high: int,
                low: int = 0) -> np.ndarray:
    """Return `a` as an int64 array whose entries lie in [low, high), checking kind and shape."""
    arr = np.asarray(a)
    if arr.dtype.kind not in "iu" or arr.dtype == np.bool_:
        raise TypeError(f"{name}: expected an integer array, got dtype {arr.dtype}")
    check_shape(name, arr, shape)
    # Exactly np.int64 in native byte order: '>i8' is converted, np.longlong (the same bits,
    # another scalar type) is relabelled, so no later lookup by dtype can miss it.
    arr = arr.astype(np.int64, copy=False).view(np.int64)
    if arr.size and (arr.min() < low or arr.max() >= high):
        raise ValueError(f"{name}: expected entries in [{low}, {high}), got range "
                         f"[{int(arr.min())}, {int(arr.max())}]")
    return arr


def integer(name: str, v: object, *, low: int | None = None, high: int | None = None) -> int:
    """Return `v` as an int in [low, high] (inclusive); bools and floats are rejected."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__} {v!r}")
    v = int(v)
    if (low is not None and v < low) or (high is not None and v > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name}: expected an int in [{lo}, {hi}], got {v}")
    return v


def positive_finite(name: str, v: object, *, allow_none: bool = False) -> float | None:
    """Return `v` as a float > 0 and finite (or None when allowed)."""
    if v is None and allow_none:
        return None
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        kind = "a positive float or None" if allow_none else "a positive float"
        raise TypeError(f"{name}: expected {kind}, got {type(v).__name__} {v!r}")
    f = float(v)
    if not math.isfinite(f) or f <= 0.0:
        raise ValueError(f"{name}: expected a finite value > 0, got {f}")
    return f


def nonnegative_finite(name: str, v: object) -> float:
    """Return `v` as a finite float >= 0 (coefficients, noise amplitudes)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected a float >= 0, got {type(v).__name__} {v!r}")
    f = float(v)
    if not math.isfinite(f) or f < 0.0:
        raise ValueError(f"{name}: expected a finite value >= 0, got {f}")
    return f


def choice(name: str, v: object, choices: Iterable[str]) -> str:
    """Return `v` if it is one of `choices`, else raise ValueError listing them."""
    choices = tuple(choices)
    if not isinstance(v, str) or v not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {v!r}")
    return v


def boolean(name: str, v: object) -> bool:
    """Return `v` if it is a bool (numpy bools too); anything else raises TypeError."""
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(v).__name__} {v!r}")
    return bool(v)


# ------------------------------------------------------------------ backend operation arguments
# Shared by every host backend (NumPy, C), so that they reject the same inputs with the same messages.

def float_arg(name: str, a: object, shape: Sequence[int | None], dtypes: tuple = FLOAT_DTYPES,
              who: str = "NumPy") -> np.ndarray:
    """float_array of the given shape whose dtype is one of `dtypes` (those backend `who` takes)."""
    arr = float_array(name, a, ndim=len(shape), shape=shape, finite=False)
    if arr.dtype.type not in dtypes:
        names = " or ".join(np.dtype(d).name for d in dtypes)
        hint = " (use backend='numpy' for float16)" if np.float16 not in dtypes else ""
        raise TypeError(f"{name}: the {who} backend takes {names}, got {arr.dtype}{hint}")
    return arr


def top_k_args(score: object, k: object, bias: object | None, probs: object | None,
               dtypes: tuple = FLOAT_DTYPES, who: str = "NumPy"
               ) -> tuple[np.ndarray, int, np.ndarray | None, np.ndarray | None]:
    """Checks of Backend.top_k: score `[T, E]` and bias `[E]` finite, 1 <= k <= E, probs `[T, E]`;
    bias and probs come back in score's dtype."""
    score = float_array("score", float_arg("score", score, (None, None), dtypes, who), ndim=2)
    T, E = score.shape
    k = integer("k", k, low=1, high=max(E, 1))
    if bias is not None:
        bias = float_array("bias", float_arg("bias", bias, (E,), FLOAT_DTYPES, who), ndim=1)
        bias = bias.astype(score.dtype, copy=False)
    if probs is not None:
        probs = float_arg("probs", probs, (T, E), dtypes, who).astype(score.dtype, copy=False)
    return score, k, bias, probs


def slot_args(expert_index: object, token_order: object | None, num_experts: object,
              capacity: object) -> tuple[np.ndarray, np.ndarray | None, int, int]:
    """The arguments of assign_slots: expert_index `<int>[T, K]` in [0, E), token_order a
    permutation of 0..T-1 (or None), E >= 1, C >= 0."""
    E = integer("num_experts", num_experts, low=1)
    C = integer("capacity", capacity, low=0)
    index = index_array("expert_index", expert_index, shape=(None, None), high=E)
    T = index.shape[0]
    memory.check("capacity", E * C * 8, f"slot_owner [E, C] = [{E}, {C}] (int64)",
                 f"an expert receives at most T = {T} pairs, so slots past T never fill: "
                 "pass capacity=min(capacity, T), as route() does")
    order = None
    if token_order is not None:
        order = index_array("token_order", token_order, shape=(T,), high=max(T, 1))
        if T and not np.array_equal(np.sort(order), np.arange(T)):
            raise ValueError(f"token_order: expected a permutation of 0..{T - 1}")
    return index, order, E, C


def ordered_slot_args(expert_index: object, order: object, num_experts: object,
                      capacity: object) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The arguments of assign_slots_ordered / keep_by_score: expert_index `<int>[T, K]` in
    [0, E), order `<int>[N]` distinct flat pair ids in [0, T*K), E >= 1, C >= 0."""
    E = integer("num_experts", num_experts, low=1)
    C = integer("capacity", capacity, low=0)
    index = index_array("expert_index", expert_index, shape=(None, None), high=E)
    TK = index.size
    pairs = index_array("order", order, shape=(None,), high=max(TK, 1))
    if pairs.size > TK or (pairs.size and np.unique(pairs).size != pairs.size):
        raise ValueError("order: expected distinct pair ids t*K + j")
    return index, pairs, E, C


def dispatch_args(x: object, slot_owner: object, k: object, weight: object | None,
                  dtypes: tuple = FLOAT_DTYPES, who: str = "NumPy"
                  ) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
    """The arguments of dispatch: x `[T, D]`, slot_owner `<int>[E, C]` in [-1, T*K), K >= 1,
    weight `[T, K]` or None (cast to x's dtype)."""
    xa = float_arg("x", x, (None, None), dtypes, who)
    k = integer("k", k, low=1)
    owner = index_array("slot_owner", slot_owner, shape=(None, None), high=xa.shape[0] * k, low=-1)
    w = None
    if weight is not None:
        w = float_arg("weight", weight, (xa.shape[0], k), dtypes, who).astype(xa.dtype, copy=False)
    return xa, owner, k, w


def pair_args(expert_out: object, expert_index: object, position: object,
              dtypes: tuple = FLOAT_DTYPES, who: str = "NumPy"
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The arguments of combine and gate_grad: expert_out `[E, C, D]`, expert_index `<int>[T, K]`
    in [0, E), position `<int>[T, K]` in [-1, C)."""
    out = float_arg("expert_out", expert_out, (None, None, None), dtypes, who)
    E, C, _ = out.shape
    index = index_array("expert_index", expert_index, shape=(None, None), high=E)
    pos = index_array("position", position, shape=index.shape, high=C, low=-1)
    return out, index, pos


def epilogue_args(name: str, a: object, other_name: str, other: object, other_shape: str,
                  dtypes: tuple = FLOAT_DTYPES, who: str = "NumPy") -> tuple[np.ndarray, np.ndarray]:
    """The in-place expert epilogues (experts.bias_relu, experts.relu_backward): `a` a
    writeable C-contiguous `[rows, cols]` float array, changed in place, so never copied; `other`
    the bias `[cols]` (other_shape "bias") or the forward's hidden `[rows, cols]`, in a's dtype."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array (it is updated in place), got "
                        f"{type(a).__name__}")
    arr = float_arg(name, a, (None, None), dtypes, who)
    if arr is not a or not (a.flags.c_contiguous and a.flags.writeable):
        raise ValueError(f"{name}: expected a C-contiguous, writeable array in native byte "
                         f"order (it is updated in place)")
    rows, cols = a.shape
    shape = (cols,) if other_shape == "bias" else (rows, cols)
    b = float_arg(other_name, other, shape, dtypes, who)
    b = np.ascontiguousarray(b, dtype=a.dtype)
    no_overlap(name, a, other_name, b)
    return a, b


def no_overlap(name: str, a: np.ndarray, other_name: str, other: np.ndarray) -> None:
    """A ValueError when output `a` shares memory with input `other`."""
    if np.may_share_memory(a, other):
        raise ValueError(f"{name}: shares memory with {other_name}; pass separate arrays")


def form_args(form: object, a: object, out: object, dh: object | None, args: tuple,
              dtypes: tuple = FLOAT_DTYPES, who: str = "NumPy"
              ) -> tuple[str, np.ndarray, np.ndarray, np.ndarray | None, tuple[float, ...]]:
    """The expert-form epilogues (Backend.form_forward / form_backward): form one of
    expert_forms.EXPERT_FORMS with a C function (not relu); a `[rows, W]` (W = 2H gated, H
    plain); dh `[rows, H]` (backward) in a's dtype; out writeable, C-contiguous, in a's dtype, of
    shape `[rows, H]` (forward) or a's (backward), sharing no memory with the inputs; args the
    form's floats, as many as it takes, not NaN."""
    name = choice("form", form, tuple(n for n, f in EXPERT_FORMS.items() if f.forward))
    f = EXPERT_FORMS[name]
    arr = float_arg("a", a, (None, None), dtypes, who)
    arr = np.ascontiguousarray(arr)
    rows, W = arr.shape
    if f.gated and W % 2:
        raise ValueError(f"a: the gated form {name!r} takes [gate | up] with an even number of "
                         f"columns (2H), got shape {tuple(arr.shape)}")
    H = W // 2 if f.gated else W
    g = None
    if dh is not None:
        g = np.ascontiguousarray(float_arg("dh", dh, (rows, H), dtypes, who), dtype=arr.dtype)
    shape = (rows, H) if dh is None else (rows, W)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out: expected a numpy array (it is written in place), got "
                        f"{type(out).__name__}")
    if out.shape != shape or out.dtype != arr.dtype:
        raise ValueError(f"out: expected shape {list(shape)} and dtype {arr.dtype}, got "
                         f"{list(out.shape)} {out.dtype}")
    if not (out.flags.c_contiguous and out.flags.writeable and out.dtype.isnative):
        raise ValueError("out: expected a C-contiguous, writeable array in native byte order "
                         "(it is written in place)")
    for other, v in (("a", arr), ("dh", g)):
        if v is not None:
            no_overlap("out", out, other, v)
    n = sum(2 if isinstance(d, tuple) else 1 for d in f.defaults)
    if len(args) != n:
        raise TypeError(f"args: the form {name!r} takes {n} float argument(s) "
                        f"({', '.join(f.keywords) or 'none'}), got {len(args)}")
    vals = []
    for i, v in enumerate(args):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or v != v:
            raise TypeError(f"args[{i}]: expected a real number (not NaN), got {v!r}")
        vals.append(float(v))
    return name, arr, out, g, tuple(vals)


def output_path(name: str, path: object) -> str:
    """A file path to write: its folder may be created, but no part of it may be a regular file
    (writing f/p.png under a file f raises FileExistsError or NotADirectoryError otherwise)."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise TypeError(f"{name}: expected a file path, got {path!r}")
    p = os.path.abspath(os.fspath(path))
    if os.path.isdir(p):
        raise ValueError(f"{name}: {path!r} is a folder, expected a file path")
    folder = os.path.dirname(p)
    while folder and not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if folder and not os.path.isdir(folder):
        raise ValueError(f"{name}: cannot write {path!r}: {folder!r} is a file, not a folder")
    return os.fspath(path)


def cli_int(low: int) -> Any:
    """An argparse type: an int >= low (argparse turns the ValueError into a one-line error)."""
    def parse(text: str) -> int:
        v = int(text)
        if v < low:
            raise ValueError(text)
        return v

    parse.__name__ = f"int >= {low}"  # argparse says "invalid int >= 1 value: '-5'"
    return parse


def cli_positive_float(text: str) -> float:
    """An argparse type: a finite float > 0."""
    v = float(text)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(text)
    return v


cli_positive_float.__name__ = "positive float"
