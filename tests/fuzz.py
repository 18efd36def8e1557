"""What the fuzz tests (test_fuzz_*.py) share: how a caller may hand over the same values, how bad
arguments are made, and the contract every public entry point keeps:

    either a ValueError/TypeError whose message starts with the name of an argument, or a result
    equal, bit for bit, to the NumPy reference run on contiguous native-order copies.

NaNs compare equal to NaNs (their payload is not part of the contract); everything else compares by
its bits, so -0.0 and 0.0 differ.
"""
from __future__ import annotations

import collections
import os
import re
import warnings

import numpy as np
from hypothesis import strategies as st

# examples per fuzz test; HYPOTHESIS_PROFILE=dev or PYMOE_FUZZ_EXAMPLES=... for more
EXAMPLES = int(os.environ.get("PYMOE_FUZZ_EXAMPLES", "150"))

# (entry point, outcome) -> cases; printed at the end of each fuzz module
STATS: collections.Counter = collections.Counter()
# (entry point, the argument an error named) -> cases, to see what the rejections were about
NAMED: collections.Counter = collections.Counter()

SPECIALS = (np.nan, np.inf, -np.inf, -0.0, 1e300, 5e-324, 65504.0, 7e4)


# ------------------------------------------------------------------------------ values
def float_values(data: st.DataObject, shape: tuple[int, ...], dtype: str,
                 nonfinite: bool = False) -> np.ndarray:
    """A C-contiguous array of `shape`: mostly normal values, sometimes special ones (signed
    zeros, subnormals, values that overflow float16/float32) and, when asked, NaN/inf."""
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    a = rng.normal(size=shape) * data.draw(st.sampled_from([1.0, 1e-3, 1e3]), label="scale")
    if a.size and data.draw(st.booleans(), label="specials"):
        pool = [v for v in SPECIALS if nonfinite or np.isfinite(v)]
        for _ in range(data.draw(st.integers(1, 3), label="n_specials")):
            a.flat[rng.integers(a.size)] = pool[rng.integers(len(pool))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 1e300 -> inf in float32 is the point
        a = np.ascontiguousarray(a.astype(dtype))
    if not nonfinite and a.dtype.kind == "f":  # a special that overflowed the dtype: its max
        a[~np.isfinite(a)] = np.finfo(a.dtype).max
    return a


def float_dtype(data: st.DataObject, label: str, bad: bool = True) -> str:
    good = ["float32", "float64", "float16"] * 8  # a wrong dtype about one time in nine
    return data.draw(st.sampled_from(good + (["int32", "bool", "complex64"] if bad else [])),
                     label=label)


# ------------------------------------------------------------------------------ presentation
def present(data: st.DataObject, a: object, label: str) -> object:
    """The same values as a caller might hand them over: another layout (Fortran, strided,
    negative strides, broadcast), byte order, integer type, a read-only array or a list."""
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "fiub":
        return a
    kinds = ["as is", "fortran", "strided", "negative", "readonly"]
    if a.dtype.kind in "fi" and a.dtype.itemsize > 1:
        kinds.append("swapped")
    if a.dtype.kind == "i":
        kinds += ["longlong", "int32", "big-endian int64"]
    if 0 < a.size <= 64:
        kinds.append("list")
    if a.ndim and a.shape[0] > 1 and (a == a[:1]).all():
        kinds.append("broadcast")
    how = data.draw(st.sampled_from(kinds), label=f"{label} as")
    if how == "fortran":
        return np.asfortranarray(a)
    if how == "strided":  # every other element of a wider buffer
        wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype) if a.ndim else None
        if wide is None:
            return a
        wide[..., ::2] = a
        return wide[..., ::2]
    if how == "negative":  # the same values, walked backwards in memory
        flipped = np.ascontiguousarray(a[tuple(slice(None, None, -1) for _ in a.shape)])
        return flipped[tuple(slice(None, None, -1) for _ in a.shape)]
    if how == "readonly":
        b = a.copy()
        b.flags.writeable = False
        return b
    if how == "swapped":
        return a.astype(a.dtype.newbyteorder(">" if a.dtype.isnative else "<"))
    if how == "longlong":
        return a.astype(np.longlong)
    if how == "int32":
        return a.astype(np.int32) if np.abs(a).max(initial=0) < 2**31 else a
    if how == "big-endian int64":
        return a.astype(">i8")
    if how == "list":
        return a.tolist()
    if how == "broadcast":
        return np.broadcast_to(a[:1], a.shape)
    return a


def canonical(a: object) -> object:
    """A contiguous native-order copy of an array argument (lists become arrays): what the
    reference runs on. Other arguments pass unchanged."""
    if isinstance(a, list):
        a = np.asarray(a)
    if isinstance(a, np.ndarray):
        a = np.array(a, dtype=a.dtype.newbyteorder("=") if a.dtype.kind in "fiub" else a.dtype,
                     order="C", copy=True)
    return a


# ------------------------------------------------------------------------------ faults
def bad_int(data: st.DataObject, label: str, good: int, low: int | None,
            high: int | None) -> object:
    """`good`, or a value an int argument must reject."""
    bad = [True, 1.5, "2", None, np.float64(good)]
    if low is not None:
        bad.append(low - 1)
    if high is not None:
        bad += [high + 1, 2**40]
    return data.draw(st.sampled_from(bad), label=label)


def maybe(data: st.DataObject, label: str, p_bad: int = 14) -> bool:
    """True about once in p_bad draws: whether to spoil this argument. (A middle value: hypothesis
    favours the ends of a range, and shrinks towards 0, the valid case.)"""
    return data.draw(st.integers(0, p_bad - 1), label=label) == p_bad // 2


def spoil_array(data: st.DataObject, a: np.ndarray, label: str, *, low: int | None = None,
                high: int | None = None) -> np.ndarray:
    """A wrong version of array `a`: another rank, one extent off, the wrong kind of dtype, or
    (index arrays, given [low, high)) an entry just outside the range."""
    kinds = ["rank", "extent", "dtype"]
    if low is not None and a.size:
        kinds.append("range")
    how = data.draw(st.sampled_from(kinds), label=f"{label} spoiled")
    if how == "rank":
        return a[..., None] if data.draw(st.booleans(), label=f"{label} up") or a.ndim < 1 \
            else a.reshape(-1)
    if how == "extent":
        if not a.ndim:
            return a[None]
        axis = data.draw(st.integers(0, a.ndim - 1), label=f"{label} axis")
        pad = [(0, 0)] * a.ndim
        pad[axis] = (0, 1)
        return np.pad(a, pad)
    if how == "dtype":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # complex -> int, NaN -> int: any wrong dtype will do
            return a.astype(np.float32) if a.dtype.kind in "iu" else a.astype(np.int64)
    b = a.copy()
    b.flat[data.draw(st.integers(0, a.size - 1), label=f"{label} at")] = \
        data.draw(st.sampled_from([low - 1, high, high + 7, -(2**62)]), label=f"{label} value")
    return b


# ------------------------------------------------------------------------------ contract
def names_an_argument(err: Exception, names: tuple[str, ...]) -> bool:
    msg = str(err)
    return any(re.match(re.escape(n) + r"(:|\[|\.)", msg) for n in names)


def same_bits(got: object, want: object) -> bool:
    """Equal values of the same dtype; floats compared by their bits, NaN equal to NaN."""
    if isinstance(want, (tuple, list)):
        return isinstance(got, (tuple, list)) and len(got) == len(want) and \
            all(same_bits(got[i], want[i]) for i in range(len(want)))
    if isinstance(want, float):
        return isinstance(got, float) and (got == want and np.signbit(got) == np.signbit(want)
                                           or (np.isnan(got) and np.isnan(want)))
    if not isinstance(want, np.ndarray):
        return got == want
    if not isinstance(got, np.ndarray) or got.shape != want.shape or \
            got.dtype.newbyteorder("=") != want.dtype.newbyteorder("="):
        return False
    g, w = canonical(got), canonical(want)
    if w.dtype.kind != "f":
        return bool(np.array_equal(g, w))
    nan = np.isnan(w)
    if not np.array_equal(nan, np.isnan(g)):
        return False
    u = f"u{w.dtype.itemsize}"
    return bool(np.array_equal(g.view(u)[~nan], w.view(u)[~nan]))


def run(fn):
    """(result, None) or (None, the exception)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(), None
    except Exception as err:  # noqa: BLE001 - the contract check decides what is acceptable
        return None, err


def check(entry: str, names: tuple[str, ...], subject, reference, *, same=same_bits,
          backend_limit=None, must_reject: str | None = None) -> object:
    """Run subject() (the call as the caller made it) and reference() (the NumPy reference on
    canonical copies) and hold them to the contract. Returns the subject's result or None.

    backend_limit(err): True when err is a documented limit of this backend (the C core takes no
    float16) that the reference does not share. must_reject: a message prefix the subject must
    raise with (an out= that overlaps an input), whatever the reference does.
    """
    got, err = run(subject)
    want, ref_err = run(reference)
    for e, who in ((err, entry), (ref_err, f"{entry} reference")):
        if e is not None:
            assert isinstance(e, (ValueError, TypeError)), \
                f"{who} raised {type(e).__name__}: {e}"
            assert names_an_argument(e, names), f"{who}: error names no argument: {e}"
    if err is not None:
        NAMED[entry, re.split(r"[:\[. ]", str(err), maxsplit=1)[0]] += 1
    if must_reject is not None:  # unless another argument is already wrong, it is this one
        assert err is not None and (ref_err is not None or str(err).startswith(must_reject)
                                    or (backend_limit is not None and backend_limit(err))), \
            f"{entry}: expected an error starting {must_reject!r}, got {err!r}"
        STATS[entry, "rejected"] += 1
        return None
    if ref_err is not None:
        assert err is not None, f"{entry} accepted what the reference rejects ({ref_err})"
        STATS[entry, "rejected"] += 1
        return None
    if err is not None:
        assert backend_limit is not None and backend_limit(err), \
            f"{entry} rejected what the reference accepts: {err}"
        STATS[entry, "rejected (backend limit)"] += 1
        return None
    assert same(got, want), f"{entry}: result differs from the reference\n{got!r}\n{want!r}"
    STATS[entry, "equal"] += 1
    return got


def summary() -> str:
    entries = sorted({e for e, _ in STATS})
    parts = []
    for e in entries:
        counts = {o: n for (ee, o), n in STATS.items() if ee == e}
        parts.append(f"{e}: " + ", ".join(f"{n} {o}" for o, n in sorted(counts.items())))
    total = sum(STATS.values())
    return f"fuzz: {total} cases; " + "; ".join(parts)
