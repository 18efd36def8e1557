"""Router replay (R3): record every MoE layer's expert choice in one pass, force it in another.

RL fine-tuning samples with an inference engine and trains with another stack; the two compute the
router logits in different precisions and orders, and so choose other experts for many tokens
(Megatron-LM #4168: 94% of tokens differ in at least one layer). Replaying the rollout's selection
at training removes that mismatch: the selection is forced, the gates are the training pass's own
scores at those experts (and so carry its gradient). One layer at a time that is
`route(logits, k, replay=expert_index)` / `MoELayer.forward(x, replay=expert_index)`; for a model
built from several MoELayers a Recorder collects them all:

    rec = Recorder()
    with rec.record():          # every MoELayer.forward stores its routing.expert_index
        model(x)                # (rollout, or a bf16 router: MoELayer(..., router_dtype=...))
    with rec.replay():          # each layer's n-th forward replays its n-th recorded selection
        model(x)

Megatron-Core's RouterReplay (RECORD, REPLAY_FORWARD) does the same per TopKRouter; the tests check
route(..., replay=) against its REPLAY_FORWARD. The recorder is module state of this process: one
thread at a time.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

__all__ = ["Recorder"]

_active: list[Recorder] = []  # the recorders whose record() or replay() block is running


class Recorder:
    """The selections `<int64>[T, K]` of every MoELayer.forward, per layer in call order.

    layers: the layers in the order of their first recorded forward (or as given to
    from_selections); selections(layer): that layer's list, one array per forward.
    """

    def __init__(self) -> None:
        self._layers: list[Any] = []
        self._selections: dict[int, list[np.ndarray]] = {}  # id(layer) -> one array per forward
        self._cursor: dict[int, int] = {}  # id(layer) -> forwards replayed so far
        self._mode: str | None = None  # "record", "replay" or None

    @classmethod
    def from_selections(cls, layers: Sequence[Any],
                        selections: Sequence[np.ndarray | Sequence[np.ndarray]]) -> Recorder:
        """A recorder holding selections recorded elsewhere (an inference engine's routing):
        selections[i] is layers[i]'s `[T, K]` array, or a list of them, one per forward. Each
        array is checked when it is replayed (shape, range, distinct experts)."""
        if len(layers) != len(selections):
            raise ValueError(f"selections: expected one entry per layer ({len(layers)}), got "
                             f"{len(selections)}")
        rec = cls()
        for layer, sel in zip(layers, selections):
            arrays = [sel] if isinstance(sel, np.ndarray) else list(sel)
            rec._add(layer).extend(np.asarray(a) for a in arrays)
        return rec

    @property
    def layers(self) -> list[Any]:
        return list(self._layers)

    def selections(self, layer: Any) -> list[np.ndarray]:
        """The selections recorded for `layer`, one `[T, K]` array per forward."""
        if id(layer) not in self._selections:
            raise KeyError("layer: this recorder holds no selection for that layer")
        return list(self._selections[id(layer)])

    def clear(self) -> None:
        self._layers.clear()
        self._selections.clear()
        self._cursor.clear()

    @contextmanager
    def record(self) -> Iterator[Recorder]:
        """Inside the block every MoELayer.forward appends its expert_index (what was cleared
        before: a fresh recording)."""
        self.clear()
        with self._running("record"):
            yield self

    @contextmanager
    def replay(self) -> Iterator[Recorder]:
        """Inside the block each layer's n-th forward (counted from the block's start) replays its
        n-th recorded selection; a layer with none left, or never recorded, is a ValueError. An
        explicit forward(x, replay=...) wins over the recorder."""
        self._cursor = {key: 0 for key in self._selections}
        with self._running("replay"):
            yield self

    @contextmanager
    def _running(self, mode: str) -> Iterator[None]:
        if self._mode is not None:
            raise RuntimeError(f"Recorder: already inside its {self._mode}() block")
        self._mode = mode
        _active.append(self)
        try:
            yield
        finally:
            _active.remove(self)
            self._mode = None

    def _add(self, layer: Any) -> list[np.ndarray]:
        if id(layer) not in self._selections:
            self._layers.append(layer)
            self._selections[id(layer)] = []
        return self._selections[id(layer)]

    def _next(self, layer: Any) -> np.ndarray:
        key = id(layer)
        if key not in self._selections:
            raise ValueError("replay: the Recorder holds no selection for this layer (it did not "
                             "run inside record(), nor was it given to from_selections)")
        n = self._cursor.get(key, 0)
        recorded = self._selections[key]
        if n >= len(recorded):
            raise ValueError(f"replay: this layer was recorded {len(recorded)} time(s) and is "
                             f"now run a {n + 1}-th time inside replay()")
        self._cursor[key] = n + 1
        return recorded[n]


def forced_selection(layer: Any, replay: Any) -> Any:
    """MoELayer.forward's replay argument: `replay` when given, else the selection an active
    Recorder replays for `layer`, else None."""
    if replay is not None:
        return replay
    for rec in reversed(_active):
        if rec._mode == "replay":
            return rec._next(layer)
    return None


def recording() -> bool:
    """Whether a Recorder's record() block is running."""
    return any(rec._mode == "record" for rec in _active)


def record_selection(layer: Any, expert_index: np.ndarray) -> None:
    """MoELayer.forward's report of its selection to the recorders in record() blocks."""
    for rec in _active:
        if rec._mode == "record":
            rec._add(layer).append(np.array(expert_index))  # a copy: the routing is the layer's
