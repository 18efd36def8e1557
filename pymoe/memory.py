"""The memory budget: a clear error before any single step allocates more than it.

Some reference steps build dense tensors on purpose (the `[T, K, E]` one-hot of slot assignment,
the `[T, E, C]` dispatch mask and combine weights): they are the readable form, and the indexed
formulation and the C backend compute the same values in O(T*K) memory. Past a size they would
rather end in a NumPy MemoryError or the OOM killer; each such step asks check() first, which
raises MemoryBudgetError naming the size and the cheaper path instead.

The default budget is 4 GiB per allocation step; set_memory_budget(None) removes the limit.
"""
from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Iterator
from typing import TypeVar

V = TypeVar("V")

DEFAULT_BUDGET = 4 << 30  # bytes
_budget: int | None = DEFAULT_BUDGET


class MemoryBudgetError(ValueError):
    """A step would allocate more than the memory budget (pymoe.set_memory_budget)."""


def get_memory_budget() -> int | None:
    """Bytes one step may allocate before it raises MemoryBudgetError (None: no limit)."""
    return _budget


def set_memory_budget(nbytes: int | None) -> None:
    """Set the budget in bytes (>= 0), or None for no limit. Process-wide."""
    global _budget
    if nbytes is not None:
        if isinstance(nbytes, bool) or not isinstance(nbytes, numbers.Integral):
            raise TypeError(f"nbytes: expected an int or None, got {type(nbytes).__name__}")
        if nbytes < 0:
            raise ValueError(f"nbytes: expected an int >= 0 or None, got {nbytes}")
        nbytes = int(nbytes)
    _budget = nbytes


@contextlib.contextmanager
def temporarily(get: Callable[[], V], set_: Callable[[V], object], value: V) -> Iterator[None]:
    """Run a block with a process-wide setting changed by set_(value) (the memory budget here;
    a backend's thread count or block size), then restore what get() returned before, also when
    the block raises."""
    before = get()
    set_(value)
    try:
        yield
    finally:
        set_(before)


def memory_budget(nbytes: int | None) -> contextlib.AbstractContextManager[None]:
    """Run a block under another budget, then restore the previous one."""
    return temporarily(get_memory_budget, set_memory_budget, nbytes)


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.3g} {unit}"
    return f"{n} bytes"


def check(name: str, nbytes: int, what: str, cheaper: str) -> None:
    """Raise MemoryBudgetError, naming the argument `name`, when nbytes exceeds the budget."""
    if _budget is not None and nbytes > _budget:
        raise MemoryBudgetError(f"{name}: {what} would take {_size(nbytes)}, above the "
                                f"memory budget of {_size(_budget)} "
                                f"(pymoe.set_memory_budget); {cheaper}")
