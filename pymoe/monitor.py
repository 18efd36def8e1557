"""Load monitoring over layers and steps: how evenly the router spreads the tokens, and how it moves.

A LoadTracker records, per (layer, step), the expert loads of every routing handed to it (several
micro-batches of one step add up) and derives the usual balance measures from them:

    load_e     assignments to expert e before dropping (routing.expert_load), real tokens only
    CV         std_e(load) / mean_e(load) (population std; 0 = perfectly even)
    MaxVio     max_e(load) / mean_e(load) - 1 (Wang et al. 2024, "Auxiliary-Loss-Free Load
               Balancing Strategy for Mixture-of-Experts", arXiv 2408.15664, section 4.1:
               0 = perfectly even, E - 1 = every assignment on one expert)
    dead       experts with load 0 in that step
    drop rate  share of the real (token, choice) pairs that lost their slot to capacity

A routing that carries a `token_mask` (<bool>[T], True = a real token; read with getattr, so
routings without it count every token as real) contributes its real tokens only; the padding it
had is counted apart (`padding`). Arrays over steps, for plotting, come from loads() and
series(); viz.load_heatmap draws loads() as a picture.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _checks
from .capacity import expert_load
from .routing import Routing

__all__ = ["METRICS", "LoadStats", "LoadTracker", "coefficient_of_variation", "max_violation"]

METRICS = ("cv", "max_vio", "dead", "drop_rate", "tokens", "padding")


def coefficient_of_variation(load: np.ndarray) -> float:
    """std / mean of `load` `[E]` (population std): 0 when even, 0.0 when nothing was routed."""
    load = np.asarray(load, dtype=np.float64)
    mean = load.mean()
    return float(load.std() / mean) if mean > 0 else 0.0


def max_violation(load: np.ndarray) -> float:
    """MaxVio of `load` `[E]`: max / mean - 1 (arXiv 2408.15664), 0.0 when nothing was routed."""
    load = np.asarray(load, dtype=np.float64)
    mean = load.mean()
    return float(load.max() / mean - 1.0) if mean > 0 else 0.0


@dataclass
class LoadStats:
    """What one (layer, step) saw, summed over the routings recorded for it."""
    load: np.ndarray  # <int64>[E] assignments per expert before dropping (real tokens)
    load_kept: np.ndarray  # <int64>[E] assignments per expert that kept a slot
    tokens: int = 0  # real tokens
    padding: int = 0  # tokens a token_mask marked as padding
    pairs: int = 0  # real (token, choice) pairs = tokens * K
    routings: int = 0  # micro-batches recorded

    @property
    def cv(self) -> float:
        return coefficient_of_variation(self.load)

    @property
    def max_vio(self) -> float:
        return max_violation(self.load)

    @property
    def dead(self) -> int:
        """Experts that received no assignment (before dropping)."""
        return int(np.count_nonzero(self.load == 0))

    @property
    def drop_rate(self) -> float:
        """Share of real (token, choice) pairs dropped by capacity (0.0 with none)."""
        return float(self.pairs - int(self.load_kept.sum())) / self.pairs if self.pairs else 0.0


class LoadTracker:
    """Records expert loads per layer and step; summary() in words, loads()/series() as arrays.

    Usage: `tracker.record(routing, step=s, layer=l)` after each route() (or
    `tracker.record(layer.routing, ...)` after each MoELayer.forward); records of one (layer,
    step) add up, so micro-batches of one optimizer step are one entry.

    Args:
        num_experts: E, or None to take it from the first routing (every routing must match).
    """

    def __init__(self, num_experts: int | None = None) -> None:
        self.num_experts = (None if num_experts is None
                            else _checks.integer("num_experts", num_experts, low=1))
        self._stats: dict[tuple[object, int], LoadStats] = {}  # (layer, step) -> stats

    def record(self, routing: Routing, *, step: int, layer: object = 0) -> LoadStats:
        """Add `routing`'s loads to entry (layer, step) and return that entry.

        Args:
            routing: a pymoe.Routing (from route() or MoELayer.routing).
            step: an int >= 0, the training step. layer: any hashable label (default 0).
        """
        if not isinstance(routing, Routing):
            raise TypeError(f"routing: expected a pymoe.Routing from route(), got "
                            f"{type(routing).__name__}")
        step = _checks.integer("step", step, low=0)
        try:
            hash(layer)
        except TypeError as err:
            raise TypeError(f"layer: expected a hashable label, got {type(layer).__name__}") from err
        E = routing.num_experts
        if self.num_experts is None:
            self.num_experts = E
        elif E != self.num_experts:
            raise ValueError(f"routing: expected E={self.num_experts} experts (this tracker's), "
                             f"got {E}")
        index, kept = np.asarray(routing.expert_index), np.asarray(routing.kept)  # [T, K]
        T = index.shape[0]
        mask = getattr(routing, "token_mask", None)
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)  # [T]
            index, kept = index[mask], kept[mask]
        entry = self._stats.get((layer, step))
        if entry is None:
            entry = self._stats[(layer, step)] = LoadStats(np.zeros(E, np.int64),
                                                           np.zeros(E, np.int64))
        entry.load += expert_load(index, E)
        entry.load_kept += expert_load(index[kept], E)
        entry.tokens += index.shape[0]
        entry.padding += T - index.shape[0]
        entry.pairs += index.size
        entry.routings += 1
        return entry

    def reset(self) -> None:
        """Forget every record."""
        self._stats.clear()

    @property
    def layers(self) -> list:
        """The layer labels recorded, in the order first seen."""
        return list(dict.fromkeys(layer for layer, _ in self._stats))

    def _layer(self, layer: object) -> object:
        if layer is None:
            layers = self.layers
            if len(layers) != 1:
                raise ValueError(f"layer: required when the tracker holds {len(layers)} layers "
                                 f"({layers})")
            return layers[0]
        if layer not in self.layers:
            raise ValueError(f"layer: no records for {layer!r}; recorded: {self.layers}")
        return layer

    def steps(self, layer: object = None) -> np.ndarray:
        """`<int64>[S]` the steps recorded for `layer` (None: the only layer), ascending."""
        layer = self._layer(layer)
        return np.array(sorted(s for lay, s in self._stats if lay == layer), np.int64)

    def stats(self, step: int, layer: object = None) -> LoadStats:
        """The LoadStats of (layer, step)."""
        layer = self._layer(layer)
        if (layer, step) not in self._stats:
            raise ValueError(f"step: no record of step {step!r} for layer {layer!r}")
        return self._stats[(layer, step)]

    def loads(self, layer: object = None, *, kept: bool = False) -> np.ndarray:
        """`<int64>[S, E]` the load per expert at each recorded step (rows in steps() order);
        kept=True: the assignments that kept a slot."""
        layer = self._layer(layer)
        rows = [self._stats[(layer, int(s))] for s in self.steps(layer)]
        return np.stack([r.load_kept if kept else r.load for r in rows])

    def series(self, metric: str, layer: object = None) -> np.ndarray:
        """`<float64>[S]` one of METRICS at each recorded step of `layer`."""
        if metric not in METRICS:
            raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
        layer = self._layer(layer)
        return np.array([float(getattr(self._stats[(layer, int(s))], metric))
                         for s in self.steps(layer)])

    def summary(self) -> str:
        """One line per layer: its steps, then CV, MaxVio, dead experts and drop rate at the
        first and the last step and their mean over steps; real/padding tokens in all."""
        if not self._stats:
            return "LoadTracker: nothing recorded"
        lines = [f"LoadTracker: E={self.num_experts}, {len(self.layers)} layer(s); "
                 "first -> last step (mean over steps)"]
        for layer in self.layers:
            steps = self.steps(layer)
            cv, vio = self.series("cv", layer), self.series("max_vio", layer)
            dead, drop = self.series("dead", layer), self.series("drop_rate", layer)
            tokens, pad = self.series("tokens", layer).sum(), self.series("padding", layer).sum()
            lines.append(
                f"  layer {layer}: steps {steps[0]}..{steps[-1]} ({len(steps)}); "
                f"CV {cv[0]:.3f} -> {cv[-1]:.3f} ({cv.mean():.3f}), "
                f"MaxVio {vio[0]:.3f} -> {vio[-1]:.3f} ({vio.mean():.3f}), "
                f"dead {int(dead[0])} -> {int(dead[-1])} ({dead.mean():.2f}), "
                f"dropped {drop[0]:.1%} -> {drop[-1]:.1%} ({drop.mean():.1%}); "
                f"{int(tokens)} real tokens" + (f", {int(pad)} padding" if pad else ""))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()
