"""Pictures of routing: heatmaps, slot tables, expert loads, curves (matplotlib, optional).

Install the extra with `pip install 'pymoe-routing[viz]'`. Every function saves a PNG at `path` and
returns the matplotlib Figure; without matplotlib (or with PYMOE_VIZ_TEXT=1) it prints a readable
text version instead and returns that text, so every example runs anywhere.

Figures are built with matplotlib's object-oriented API (matplotlib.figure.Figure), which needs no
display and leaves the user's pyplot backend alone.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import _checks
from .routing import Routing

DPI = 110
SHADES = " .:-=+*#%@"  # text heatmaps: light to dark


def have_matplotlib() -> bool:
    """True when pictures can be drawn (matplotlib importable and PYMOE_VIZ_TEXT unset)."""
    if os.environ.get("PYMOE_VIZ_TEXT") == "1":
        return False
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def no_picture_reason() -> str:
    """Why have_matplotlib() is False, in words."""
    if os.environ.get("PYMOE_VIZ_TEXT") == "1":
        return "PYMOE_VIZ_TEXT=1 asks for text"
    return "matplotlib is not installed: pip install matplotlib"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig, path: str):
    _checks.output_path("path", path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return fig


def _routing(name: str, r: object) -> Routing:
    if not isinstance(r, Routing):
        raise TypeError(f"{name}: expected a pymoe.Routing from route(), got {type(r).__name__}")
    return r


def _matrix(name: str, a: object) -> np.ndarray:
    """A non-empty 2-D numeric array."""
    try:
        m = np.asarray(a, dtype=float)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name}: expected a 2-D numeric array, got {type(a).__name__}") from err
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"{name}: expected a non-empty 2-D array, got shape {m.shape}")
    return m


def _values(name: str, v: object) -> list[float]:
    """A 1-D sequence of numbers, as floats."""
    try:
        a = np.asarray(v, dtype=float)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name}: expected a sequence of numbers, got {type(v).__name__}") from err
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of numbers, got shape {a.shape}")
    return a.tolist()


def _mapping(name: str, m: object) -> dict:
    if not isinstance(m, Mapping):
        raise TypeError(f"{name}: expected a dict label -> values, got {type(m).__name__}")
    if not m:
        raise ValueError(f"{name}: expected at least one entry, got an empty {type(m).__name__}")
    return dict(m)


def _emit(text: str) -> str:
    print(text)
    return text


def _shade(v: float, vmax: float) -> str:
    if vmax <= 0:
        return SHADES[0]
    return SHADES[min(int(v / vmax * (len(SHADES) - 1) + 0.5), len(SHADES) - 1)]


# ------------------------------------------------------------------ routing of one batch

def _token_expert_axes(ax, E: int, title: str, xlabel: str) -> None:
    """Label a tokens-down, experts-across panel (the routing pictures share this layout)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("token")
    ax.set_xticks(range(E))
    ax.set_title(title, fontsize=10)


def routing_heatmap(routing: Routing, path: str, *, title: str | None = None,
                    max_tokens: int = 64) -> Any:
    """Token-by-expert router probabilities, each token's chosen experts marked with the choice
    number (1 = first choice), dropped choices crossed out in red.

    Text version: one row per token, a shade per expert (darker = more probable), and the
    choice number or 'x' (dropped) after it.
    """
    routing = _routing("routing", routing)
    T, E = routing.probs.shape
    n = min(T, max_tokens)
    title = title or (f"routing {T} tokens to {E} experts: K={routing.k}, C={routing.capacity}\n"
                      f"1, 2 = kept choice; x = dropped ({routing.dropped_fraction:.0%} of pairs)")
    if not have_matplotlib():
        lines = [title.replace("\n", ": "), "token  " + " ".join(f"e{e:<2d}" for e in range(E))]
        vmax = float(routing.probs[:n].max(initial=0))
        for t in range(n):
            cells = []
            for e in range(E):
                mark = " "
                for j in np.nonzero(routing.expert_index[t] == e)[0].tolist():
                    mark = str(j + 1) if routing.kept[t, j] else "x"
                cells.append(_shade(routing.probs[t, e], vmax) * 2 + mark)
            lines.append(f"t{t:<5d}" + " ".join(cells))
        lines.append(f"shades '{SHADES}' = probability 0..{vmax:.2f}; 1, 2, ... = kept choice, "
                     "x = dropped choice")
        return _emit("\n".join(lines))
    fig = _figure(max(4.2, 1.9 + 0.55 * E), 1.9 + 0.24 * n)
    ax = fig.add_subplot()
    im = ax.imshow(routing.probs[:n], aspect="auto", cmap="Blues", vmin=0)
    for t in range(n):
        for j in range(routing.k):
            chosen = int(routing.expert_index[t, j])
            if routing.kept[t, j]:
                ax.text(chosen, t, str(j + 1), ha="center", va="center", fontsize=9,
                        color="white" if routing.probs[t, chosen] > 0.5 * routing.probs[:n].max()
                        else "black", fontweight="bold")
            else:
                ax.plot(chosen, t, marker="x", color="red", markersize=11, mew=2.5)
    _token_expert_axes(ax, E, title, "expert")
    fig.colorbar(im, ax=ax, label="router probability")
    return _save(fig, path)


def dispatch_combine_picture(routing: Routing, path: str, *, max_tokens: int = 32) -> Any:
    """The [T, E, C] combine weights for a tiny case, one panel per expert (tokens down, slots
    across); a coloured cell is a token sitting in that slot, its colour the gate. The
    dispatch mask is the same picture in black and white. Below, the same numbers as one flat
    [T, E*C] matrix (the layout of the HF blog's "tokens x (experts x slots)" figure): the
    reshape that turns dispatch and combine into one matrix product each.

    Text version: each expert's slots with the token and gate sitting in them.
    """
    routing = _routing("routing", routing)
    T, E, C = routing.num_tokens, routing.num_experts, routing.capacity
    n = min(T, max_tokens)
    cw = routing.combine_weights[:n]  # [n, E, C]
    if not have_matplotlib():
        lines = [f"dispatch / combine: {E} experts x {C} slots (token: gate, -- = empty slot)"]
        owner = routing.slot_owner
        for e in range(E):
            cells = []
            for c in range(C):
                o = owner[e, c]
                cells.append("--" if o < 0 else f"t{o // routing.k}: {routing.gate.flat[o]:.2f}")
            lines.append(f"expert {e}: " + " | ".join(cells))
        return _emit("\n".join(lines))
    fig = _figure(1.6 + 0.45 * E * max(C, 2), 2 * (2.0 + 0.28 * n))
    grid = fig.add_gridspec(2, E)
    axes = [fig.add_subplot(grid[0, e]) for e in range(E)]
    vmax = float(cw.max(initial=0)) or 1.0
    mask = routing.dispatch_mask[:n]  # [n, E, C]
    for e, ax in enumerate(axes):
        im = ax.imshow(np.where(mask[:, e, :], cw[:, e, :], np.nan),
                       aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        for t, c in zip(*np.nonzero(mask[:, e, :])):
            ax.text(c, t, f"{cw[t, e, c]:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if cw[t, e, c] > 0.5 * vmax else "white")
        ax.set_title(f"expert {e}", fontsize=10)
        ax.set_xlabel("slot")
        ax.set_xticks(range(C))
        ax.set_facecolor("#f0f0f0")
        if e == 0:
            ax.set_ylabel("token")
        else:
            ax.set_yticklabels([])
    flat = fig.add_subplot(grid[1, :])
    flat.imshow(np.where(mask.reshape(n, E * C), cw.reshape(n, E * C), np.nan), aspect="auto",
                cmap="viridis", vmin=0, vmax=vmax)
    for b in range(1, E):  # expert boundaries in the flat layout
        flat.axvline(b * C - 0.5, color="black", lw=1)
    flat.set_xticks([e * C + (C - 1) / 2 for e in range(E)], [f"expert {e}" for e in range(E)])
    flat.set_facecolor("#f0f0f0")
    flat.set_xlabel(f"column e*C + c: expert e, slot c (C = {C})")
    flat.set_ylabel("token")
    flat.set_title(f"the same, flat: combine_weights.reshape(T, E*C) = [{T}, {E * C}]\n"
                   "y = flat @ expert_out.reshape(E*C, D)", fontsize=10)
    fig.suptitle(f"combine_weights [T, E, C] = [{T}, {E}, {C}]: the slot each token sits in, "
                 "and its gate (grey: empty)", fontsize=10)
    fig.colorbar(im, ax=axes + [flat], label="combine weight (gate)")
    return _save(fig, path)


def expert_load_bars(routings: Routing | Mapping[str, Routing], path: str) -> Any:
    """Assignments per expert before and after dropping, with the capacity line. Several
    routings (a dict label -> Routing) give one panel each.

    Text version: one bar of '#' (kept) and 'x' (dropped) per expert.
    """
    items = ({"": routings} if isinstance(routings, Routing) else
             {k: _routing(f"routings[{k!r}]", r) for k, r in _mapping("routings", routings).items()})
    if not have_matplotlib():
        lines = []
        for label, r in items.items():
            lines.append(f"{label + ': ' if label else ''}expert load (C = {r.capacity}; "
                         f"# kept, x dropped)")
            scale = max(1.0, float(r.expert_load.max(initial=0)) / 50)
            for e in range(r.num_experts):
                kept, load = int(r.expert_load_kept[e]), int(r.expert_load[e])
                lines.append(f"  e{e:<3d}{'#' * round(kept / scale)}{'x' * round((load - kept) / scale)}"
                             f" {load} ({load - kept} dropped)")
        return _emit("\n".join(lines))
    fig = _figure(3.2 + 3.6 * len(items), 4.0)
    axes = fig.subplots(1, len(items), squeeze=False, sharey=True)[0]  # compare panels by eye
    for ax, (label, r) in zip(axes, items.items()):
        xs = np.arange(r.num_experts)
        ax.bar(xs - 0.2, r.expert_load, 0.4, label="before dropping", color="tab:orange")
        ax.bar(xs + 0.2, r.expert_load_kept, 0.4, label="after dropping", color="tab:blue")
        ax.axhline(r.capacity, color="k", ls="--", lw=1, label=f"capacity C = {r.capacity}")
        ax.set_xlabel("expert")
        ax.set_ylabel("assignments (token, choice)")
        ax.set_xticks(xs)
        ax.set_title(f"{label + chr(10) if label else ''}expert load: {r.dropped_fraction:.1%} of "
                     "(token, choice) pairs dropped", fontsize=10)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    return _save(fig, path)


# ------------------------------------------------------------------ curves and tables

def curves(x: Sequence[float] | None, series: Mapping[str, Sequence[float]], path: str, *,
           title: str, xlabel: str, ylabel: str, logy: bool = False,
           reference: tuple[float, str] | None = None,
           counts: Mapping[str, Sequence[int]] | None = None, legend: str = "inside") -> Any:
    """Line plot of several series over x (or over their index when x is None): drop rate
    against capacity factor, loss against epoch, ... reference=(y, label) adds a dashed line.
    counts: for some series, how many items each point averages over; written next to each
    point (above it for the 1st, 3rd, ... series, below it for the others, so that two series
    meeting at a point keep their numbers apart), so that a mean over two tokens does not look
    like a mean over two thousand. legend: "inside" (matplotlib's best spot in the axes) or
    "below" (a row of its own under the x label, for curves that fill the axes).

    Text version: a table, one column per series (long series shown every few points).
    """
    series = {k: _values(f"series[{k!r}]", v) for k, v in _mapping("series", series).items()}
    n = max(len(v) for v in series.values())
    if n == 0:
        raise ValueError("series: every series is empty; expected at least one point")
    xs = list(x) if x is not None else list(range(1, n + 1))
    if len(xs) < n:
        raise ValueError(f"x: expected at least {n} values (the longest series), got {len(xs)}")
    if not have_matplotlib():
        step = max(1, n // 15)
        head = f"{xlabel:>10s} " + " ".join(f"{k[:14]:>14s}" for k in series)
        rows = [f"{xs[i]:>10.3g} " + " ".join(f"{v[i]:>14.4g}" if i < len(v) else f"{'':>14s}"
                                              for v in series.values())
                for i in range(0, n, step)]
        return _emit("\n".join([f"{title} ({ylabel})", head, *rows]))
    if legend not in ("inside", "below"):
        raise ValueError(f"legend: expected 'inside' or 'below', got {legend!r}")
    entries = len(series) + (reference is not None)
    below = legend == "below"
    legend_rows = -(-entries // 2)  # two entries a row
    legend_h = 0.2 + 0.2 * legend_rows
    fig = _figure(6.4, 4.0 + (legend_h if below else 0))
    if below:
        grid = fig.add_gridspec(2, 1, height_ratios=[4.0, legend_h])
        ax, key = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
        key.axis("off")
    else:
        ax = fig.add_subplot()
    for i, (label, v) in enumerate(series.items()):
        line, = ax.plot(xs[:len(v)], v, marker="o" if len(v) <= 30 else None, ms=4, label=label)
        above = i % 2 == 0
        for xi, yi, n in zip(xs, v, (counts or {}).get(label, ())):
            if np.isfinite(yi):
                ax.annotate(f"{n}", (xi, yi), textcoords="offset points",
                            xytext=(0, 4 if above else -4), ha="center",
                            va="bottom" if above else "top", fontsize=6, color=line.get_color())
    if reference is not None:
        ax.axhline(reference[0], color="k", ls="--", lw=1, label=reference[1])
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if below:
        key.legend(*ax.get_legend_handles_labels(), loc="center", ncol=2, fontsize=8,
                   frameon=False)
    else:
        ax.legend(fontsize=8)
    return _save(fig, path)


def class_expert_heatmap(counts: np.ndarray, path: str, *,
                         class_names: Sequence[str] | None = None, title: str | None = None) -> Any:
    """Which experts each class is routed to: counts `[classes, E]` normalised per class (row),
    so a row concentrated on few experts shows specialisation.

    Text version: one row per class, a shade and a percentage per expert.
    """
    counts = _matrix("counts", counts)  # [classes, E]
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n_cls, E = share.shape
    names = list(class_names) if class_names is not None else [str(c) for c in range(n_cls)]
    title = title or "share of each class's tokens routed to each expert\n(first choice)"
    if not have_matplotlib():
        lines = [title, "class  " + " ".join(f"  e{e:<3d}" for e in range(E))]
        for c in range(n_cls):
            lines.append(f"{names[c]:>5s}  " + " ".join(f"{_shade(v, 1.0)}{v:5.0%}" for v in share[c]))
        return _emit("\n".join(lines))
    fig = _figure(max(4.5, 1.8 + 0.75 * E), 1.4 + 0.38 * n_cls)
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="magma_r", vmin=0, vmax=1, aspect="auto")
    for c in range(n_cls):
        for e in range(E):
            ax.text(e, c, f"{share[c, e]:.0%}", ha="center", va="center", fontsize=8,
                    color="white" if share[c, e] > 0.55 else "black")
    ax.set_xticks(range(E))
    ax.set_yticks(range(n_cls), names)
    ax.set_xlabel("expert")
    ax.set_ylabel("class")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="share of the class")
    return _save(fig, path)


def benchmark_bars(rows: Sequence[Any], path: str, *, reference: float | None = None) -> Any:
    """The benchmark as pictures (rows: pymoe.bench.report.Row): per problem, grouped bars of
    effective GB/s per operation and implementation on a log axis (the dense einsums sit ~1000x
    below the compiled rows), with the same-run copy bandwidth as a dashed line; whole-layer rows
    as horizontal bars of milliseconds.

    Text version: the same numbers as tables.
    """
    timed = [r for r in rows if r.ms is not None]
    sections = [s for s in dict.fromkeys(r.section for r in timed) if not s.startswith("layer")]
    layer = [r for r in timed if r.section.startswith("layer")]
    if not have_matplotlib():
        lines = []
        for sec in sections:
            srows = [r for r in timed if r.section == sec and r.gbps is not None]
            impls = list(dict.fromkeys(r.impl for r in srows))
            lines += [sec, f"  {'op':14s}" + "".join(f"{i[:16]:>17s}" for i in impls)]
            for op in dict.fromkeys(r.op for r in srows):
                vals = [next((f"{r.gbps:.2f} GB/s" for r in srows if r.op == op and r.impl == i),
                             "-") for i in impls]
                lines.append(f"  {op:14s}" + "".join(f"{v:>17s}" for v in vals))
        if reference:
            lines.append(f"copy bandwidth (np.copyto): {reference:.2f} GB/s")
        if layer:
            lines.append(layer[0].section)
            lines += [f"  {r.impl:20s} {r.ms:10.1f} ms" for r in layer]
        return _emit("\n".join(lines))
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    n = len(sections) + (1 if layer else 0)
    heights = [3.2] * len(sections) + ([0.6 + 0.45 * len(layer)] if layer else [])
    fig = _figure(12, sum(heights) + 0.3)
    axes = fig.subplots(n, 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, sec in zip(axes, sections):
        srows = [r for r in timed if r.section == sec and r.gbps is not None]
        ops = list(dict.fromkeys(r.op for r in srows))
        impls = list(dict.fromkeys(r.impl for r in srows))
        width = 0.8 / max(len(impls), 1)
        for i, impl in enumerate(impls):
            bars = [next((r.gbps for r in srows if r.op == op and r.impl == impl), 0) for op in ops]
            ax.bar([o + i * width for o in range(len(ops))], bars, width, label=impl)
        if reference:
            ax.axhline(reference, color="k", ls="--", lw=1, label=f"np.copyto {reference:.1f} GB/s")
        ax.set_xticks([o + width * (len(impls) - 1) / 2 for o in range(len(ops))], ops)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("effective GB/s (log)")
        ax.set_title(sec, fontsize=9)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    if layer:
        ax = axes[-1]
        bars = ax.barh([r.impl for r in layer], [r.ms for r in layer], color="tab:gray")
        ax.bar_label(bars, fmt="%.0f ms", fontsize=8, padding=3)
        ax.set_xlim(0, max(r.ms for r in layer) * 1.15)
        ax.set_xlabel("ms (forward + backward), lower is better")
        ax.set_title(layer[0].section, fontsize=9)
    return _save(fig, path)


# ------------------------------------------------------------------ expert parallelism

def send_matrices(matrices: Mapping[str, np.ndarray], path: str, *, title: str,
                  unit: str = "KiB", scale: float = 1024.0) -> Any:
    """P x P heatmaps [sender rank, receiver rank] side by side, one per label (bytes sent in
    each all-to-all mode, say), every cell annotated with its value / scale in `unit`.

    Text version: one table per label.
    """
    mats = {k: _matrix(f"matrices[{k!r}]", v) / scale for k, v in _mapping("matrices",
                                                                            matrices).items()}
    for k, m in mats.items():
        if m.shape[0] != m.shape[1]:
            raise ValueError(f"matrices[{k!r}]: expected a square [P, P] matrix, got {m.shape}")
    vmax = max(float(m.max(initial=0)) for m in mats.values())
    if not have_matplotlib():
        lines = [title]
        for label, m in mats.items():
            P = m.shape[0]
            lines += [f"{label} ({unit}), row = sender, column = receiver",
                      "      " + " ".join(f"{'to ' + str(q):>10s}" for q in range(P))]
            lines += [f"rank {r}" + " ".join(f"{_shade(v, vmax)}{v:9.1f}" for v in m[r])
                      for r in range(P)]
        return _emit("\n".join(lines))
    P = next(iter(mats.values())).shape[0]
    fig = _figure(1.0 + 3.2 * len(mats), 3.6)
    axes = fig.subplots(1, len(mats), squeeze=False)[0]
    for ax, (label, m) in zip(axes, mats.items()):
        im = ax.imshow(m, cmap="viridis", vmin=0, vmax=max(vmax, 1e-12))
        for r in range(P):
            for q in range(P):
                ax.text(q, r, f"{m[r, q]:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if m[r, q] < 0.6 * vmax else "black")
        ax.set_xticks(range(P))
        ax.set_yticks(range(P))
        ax.set_xlabel("receiving rank")
        ax.set_ylabel("sending rank")
        ax.set_title(label, fontsize=9)
    fig.colorbar(im, ax=list(axes), label=unit)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


# ------------------------------------------------------------------ routing variants

def expert_choice_picture(routing: Routing, path: str, *, max_tokens: int = 64) -> Any:
    """Expert-choice routing (selection="experts"): which tokens each expert took.

    Token-by-expert scores with a dot where the expert took the token; the right margin counts
    each token's experts (0..E: some tokens get several, some none). Text version: one row per
    token, '#' = taken, '.' = not taken, then the count.
    """
    routing = _routing("routing", routing)
    T, E = routing.probs.shape
    n = min(T, max_tokens)
    taken = np.zeros((T, E), dtype=bool)  # [T, E]
    rows = np.broadcast_to(np.arange(T)[:, None], routing.expert_index.shape)
    taken[rows[routing.kept], routing.expert_index[routing.kept]] = True
    per_token = taken.sum(axis=1)  # [T]
    head = f"expert choice: each of {E} experts takes its top C={routing.capacity} of {T} tokens"
    tally = (f"tokens with 0 experts: {int((per_token == 0).sum())}, "
             f"with 2+: {int((per_token >= 2).sum())}")
    if not have_matplotlib():
        lines = [f"{head}; {tally}", "token  " + " ".join(f"e{e:<2d}" for e in range(E))
                 + "  experts"]
        for t in range(n):
            cells = " ".join(("#" if taken[t, e] else ".") + "  " for e in range(E))
            lines.append(f"t{t:<5d}{cells}  {per_token[t]}")
        return _emit("\n".join(lines))
    fig = _figure(max(4.8, 2.6 + 0.55 * E), 2.1 + 0.24 * n)
    ax = fig.add_subplot()
    im = ax.imshow(routing.probs[:n], aspect="auto", cmap="Greens", vmin=0)
    tt, ee = np.nonzero(taken[:n])
    ax.scatter(ee, tt, s=40, c="black", marker="o")
    for t in range(n):  # a column of counts right of the last expert
        ax.text(E - 0.1, t, str(per_token[t]), ha="center", va="center", fontsize=8)
    ax.axvline(E - 0.5, color="black", lw=1)
    ax.set_xlim(-0.5, E + 0.3)
    title = (f"expert choice: each of {E} experts takes its\ntop C={routing.capacity} of the {T} "
             f"tokens (dots)\n{tally}")
    _token_expert_axes(ax, E, title, "expert")
    ax.set_xticks([*range(E), E - 0.1], [*map(str, range(E)), "experts\nper token"])
    fig.colorbar(im, ax=ax, label="router score")
    return _save(fig, path)


def group_limited_picture(routing: Routing, path: str, *, max_tokens: int = 64) -> Any:
    """Group-limited top-K (pymoe.options' group keywords): per token, the expert groups it may use
    (shaded) and the experts it chose inside them (choice numbers, x = dropped).

    Text version: one row per token, groups separated by '|', '-' for experts of groups the token
    may not use, the choice number for chosen experts, '.' otherwise.
    """
    routing = _routing("routing", routing)
    from .variants.group_limited import group_settings, limit_to_groups
    from .variants.scores import routing_selection_scores

    G, per_token, summed = group_settings(routing.options)
    T, E = routing.probs.shape
    n = min(T, max_tokens)
    ranked = routing_selection_scores(routing)
    allowed = np.isfinite(limit_to_groups(ranked, G, per_token, summed))  # [T, E]
    title = (f"group-limited top-{routing.k}: {G} groups of {E // G} experts\n"
             f"best {per_token} group(s) per token by the sum of its top {summed}\n"
             "grey = group not allowed, x = dropped")
    mark = np.full((T, E), "", dtype=object)
    for t in range(n):
        for j, e in enumerate(routing.expert_index[t]):
            mark[t, e] = str(j + 1) if routing.kept[t, j] else "x"
    if not have_matplotlib():
        lines = [title.replace("\n", " ")]
        per = E // G
        for t in range(n):
            cells = [mark[t, e] or ("." if allowed[t, e] else "-") for e in range(E)]
            groups = ["".join(c.ljust(2) for c in cells[g * per:(g + 1) * per]) for g in range(G)]
            lines.append(f"t{t:<4d}|" + "|".join(groups) + "|")
        return _emit("\n".join(lines))
    fig = _figure(max(4.6, 2.0 + 0.5 * E), 2.2 + 0.24 * n)
    ax = fig.add_subplot()
    shown = np.where(allowed[:n], routing.probs[:n], np.nan)
    im = ax.imshow(shown, aspect="auto", cmap="Purples", vmin=0)
    ax.imshow(np.where(allowed[:n], np.nan, 1.0), aspect="auto", cmap="Greys", vmin=0, vmax=3)
    for t in range(n):
        for e in range(E):
            if mark[t, e] == "x":
                ax.plot(e, t, marker="x", color="red", markersize=10, mew=2.2)
            elif mark[t, e]:
                ax.text(e, t, mark[t, e], ha="center", va="center", fontsize=9, fontweight="bold")
    for g in range(1, G):
        ax.axvline(g * E // G - 0.5, color="black", lw=1.5)
    _token_expert_axes(ax, E, title, "expert (vertical lines: group boundaries)")
    fig.colorbar(im, ax=ax, label="router score (allowed groups)")
    return _save(fig, path)


# ------------------------------------------------------------------ presets side by side

def capacity_setting(routings: Mapping[str, Routing]) -> str:
    """The capacity the routings were made with, in words: one shared capacity factor (and
    minimum), dropless for all, or each preset's own ("capacity factor 1.0 for every preset, no
    minimum C"). Each preset still turns a factor into C by its own rule (pymoe.options)."""
    from .capacity import capacity_words

    fixed, factors, minima = capacity_words([r.options for r in routings.values()])
    if fixed != {None}:
        return (f"fixed C = {fixed.pop()} for every preset" if len(fixed) == 1
                else "each preset's own fixed C")
    if factors == {None}:
        return "dropless (no capacity limit) for every preset"
    if len(factors) > 1:
        return "each preset's own capacity factor (dropless where it is)"
    words = f"capacity factor {factors.pop()} for every preset"
    if len(minima) > 1:
        return words + ", each its own minimum C"
    m = minima.pop()
    return words + (", no minimum C" if m == 0 else f", minimum C {m}")


def _percent(v: float) -> str:
    """A percentage for a bar label: whole numbers, one decimal below 10 (0.4%, not 0%)."""
    return "0%" if v == 0 else f"{v:.1f}%" if v < 10 else f"{v:.0f}%"


def preset_differences(comparison: Any, path: str, *, max_tokens: int = 48) -> Any:
    """A pymoe.compare() result: one row per preset, one column per (token, choice) pair of the
    first max_tokens tokens, coloured by why the pair differs from the first preset (another
    expert, dropped in one routing only, another gate); beside it each preset's drop rate (with
    its C) and aux loss over all the tokens. The title names the capacity setting
    (capacity_setting) and how many of the tokens the left panel shows.

    Text version: one line per preset, a character per pair ('.' same, 'E' other expert,
    'D' dropped in one only, 'G' other gate), then the table.
    """
    from .compare import Comparison

    if not isinstance(comparison, Comparison):
        raise TypeError(f"comparison: expected the result of pymoe.compare(), got "
                        f"{type(comparison).__name__}")
    names = list(comparison.names)
    r0 = comparison.routings[names[0]]
    T, n, K = r0.num_tokens, min(r0.num_tokens, max_tokens), r0.k
    shown = f"the first {n} of {T} tokens" if n < T else f"all {T} tokens"
    setting = capacity_setting(comparison.routings)
    codes = np.stack([comparison.reason[name][:n].reshape(-1) for name in names])  # [P, n*K]
    if not have_matplotlib():
        marks = ".EDG"
        lines = [f"pairs (token, choice) of {shown} vs {names[0]!r}: . same, "
                 "E other expert, D dropped in one only, G other gate"]
        lines += [f"{name:16s} " + "".join(marks[c] for c in row) for name, row in zip(names, codes)]
        return _emit("\n".join(lines + ["", f"capacity: {setting}", comparison.table()]))
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colours = ["#e8e8e8", "tab:red", "tab:orange", "tab:blue"]
    height = 0.9 + 0.34 * len(names)
    fig = _figure(11.5, height + 1.25)
    grid = fig.add_gridspec(2, 3, width_ratios=[5, 1.3, 1.2], height_ratios=[height, 0.3])
    ax = fig.add_subplot(grid[0, 0])
    ax_drop = fig.add_subplot(grid[0, 1], sharey=ax)
    ax_aux = fig.add_subplot(grid[0, 2], sharey=ax)
    key = fig.add_subplot(grid[1, :])
    key.axis("off")
    ax.imshow(codes, aspect="auto", cmap=ListedColormap(colours), vmin=-0.5, vmax=3.5,
              interpolation="nearest")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names)
    ticks = np.arange(0, n, max(1, n // 12))
    ax.set_xticks(ticks * K)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.set_xlabel(f"token (its {K} choices side by side)")
    ax.set_title(f"(token, choice) pairs of {shown} vs {names[0]!r}", fontsize=10)
    labels = ["same", "other expert", "dropped in one only", "other gate"]
    key.legend(handles=[Patch(color=c, label=lab) for c, lab in zip(colours, labels)],
               loc="center", ncol=4, fontsize=8, frameon=False)
    y = np.arange(len(names))
    rows = {row.name: row for row in comparison.rows}
    drops = [100 * rows[name].dropped_fraction for name in names]
    bars = ax_drop.barh(y, drops, color="tab:orange")
    ax_drop.bar_label(bars, [f"{_percent(d)}, C={rows[name].capacity}"
                             for d, name in zip(drops, names)], fontsize=7, padding=2)
    ax_drop.set_xlim(0, max(max(drops), 1.0) * 1.9)  # room for the labels
    ax_drop.set_xlabel("pairs dropped (%)")
    ax_drop.set_title("drop rate, all tokens", fontsize=10)
    ax_aux.barh(y, [rows[name].aux_loss for name in names], color="tab:green")
    ax_aux.set_xlabel("own aux-loss value")
    ax_aux.set_title("aux loss, all tokens", fontsize=10)
    for a in (ax_drop, ax_aux):
        a.grid(axis="x", alpha=0.3)
        a.tick_params(axis="y", labelleft=False)
    fig.suptitle(f"{len(names)} presets on the same router logits (T={T}, E={r0.num_experts}, "
                 f"K={K}): {setting}", fontsize=11)
    return _save(fig, path)


# ------------------------------------------------------------------ load over training steps

def load_heatmap(loads: np.ndarray | Mapping[str, np.ndarray], path: str, *,
                 steps: Sequence[float] | None = None, title: str | None = None,
                 ylabel: str = "step") -> Any:
    """Load per expert over steps: loads `[S, E]` (monitor.LoadTracker.loads()), or a dict
    label -> `[S, E]` for one panel each (same S). Each cell is the expert's load over the
    step's mean load, so 1 is even (white; red above, blue below) and every row averages 1;
    steps labels the rows (default 1..S), ylabel names them.

    Text version: one row per step (every few steps when S > 16), a shade per expert (darker =
    more loaded, the darkest at the largest ratio shown) and the row's max / mean.
    """
    items = ({"": _matrix("loads", loads)} if not isinstance(loads, Mapping) else
             {k: _matrix(f"loads[{k!r}]", v) for k, v in _mapping("loads", loads).items()})
    shapes = {m.shape for m in items.values()}
    if len(shapes) != 1:
        raise ValueError(f"loads: expected every panel to have the same [S, E] shape, got "
                         f"{sorted(shapes)}")
    S, E = next(iter(shapes))
    ys = list(steps) if steps is not None else list(range(1, S + 1))
    if len(ys) != S:
        raise ValueError(f"steps: expected {S} labels (one per row of loads), got {len(ys)}")
    ratios = {}
    for label, m in items.items():
        if not (np.isfinite(m).all() and (m >= 0).all()):
            raise ValueError(f"loads{'[' + repr(label) + ']' if label else ''}: expected "
                             "finite non-negative loads")
        mean = m.mean(axis=1, keepdims=True)  # [S, 1]
        ratios[label] = np.divide(m, mean, out=np.zeros_like(m), where=mean > 0)  # [S, E]
    vmax = max(2.0, max(float(r.max()) for r in ratios.values()))
    title = title or "expert load over training (load / mean load; 1 = even)"
    if not have_matplotlib():
        lines = [title]
        every = max(1, -(-S // 16))
        for label, r in ratios.items():
            if label:
                lines.append(f"{label}:")
            lines.append(f"  {ylabel[:6]:>6s}  " + "".join(f"{e % 10}" for e in range(E))
                         + "  max/mean")
            for i in list(range(0, S, every)) + ([S - 1] if (S - 1) % every else []):
                lines.append(f"  {ys[i]!s:>6s}  " + "".join(_shade(v, vmax) for v in r[i])
                             + f"  {r[i].max():.2f}")
        return _emit("\n".join(lines))
    from matplotlib.colors import TwoSlopeNorm

    norm = TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=vmax)
    fig = _figure(1.4 + (1.6 + 0.28 * E) * len(ratios), 1.6 + min(0.12 * S, 5.0))
    axes = fig.subplots(1, len(ratios), squeeze=False, sharey=True)[0]
    im = None
    for ax, (label, r) in zip(axes, ratios.items()):
        im = ax.imshow(r, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(E) if E <= 16 else range(0, E, max(1, E // 8)))
        ticks = sorted({0, S // 2, S - 1})
        ax.set_yticks(ticks, [str(ys[i]) for i in ticks])
        ax.set_xlabel("expert")
        ax.set_title(label or title, fontsize=9)
    axes[0].set_ylabel(ylabel)
    fig.colorbar(im, ax=list(axes), label="load / mean load")
    if any(items):
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


# ------------------------------------------------------------------ router precision

def flip_margins(report: Any, path: str, *, bins: int = 24) -> Any:
    """A pymoe.precision.FlipReport: the histogram of top-K margins (the K-th minus the (K+1)-th
    float32 score, log scale), the tokens whose experts changed in report.dtype stacked in red;
    flips sit at the smallest margins, below the format's spacing.

    Text version: one row per margin decade, '#' per token, 'x' for the flipped ones.
    """
    from .precision import FlipReport

    if not isinstance(report, FlipReport):
        raise TypeError(f"report: expected a pymoe.precision.FlipReport from flip_report(), got "
                        f"{type(report).__name__}")
    bins = _checks.integer("bins", bins, low=1)
    m = np.asarray(report.margins, dtype=float)  # [T]
    finite = np.isfinite(m)
    if not finite.any():
        raise ValueError("report: no finite margin to draw (T = 0, or K = E: nothing can flip)")
    tiny = float(np.finfo(np.float32).tiny)
    logm = np.log10(np.maximum(m[finite], tiny))  # [T'] ties (margin 0) at the float32 floor
    flipped = np.asarray(report.flipped)[finite]  # [T']
    title = (f"float32 -> {report.dtype}, K = {report.k}: {report.tokens_flipped} of "
             f"{report.tokens} tokens ({report.token_rate:.2%}) change experts")
    if not have_matplotlib():
        lo, hi = int(np.floor(logm.min())), int(np.floor(logm.max()))
        decade = np.floor(logm).astype(int)  # [T']
        scale = max(1.0, max(int(np.count_nonzero(decade == d)) for d in range(lo, hi + 1)) / 50)
        lines = [title, "top-K margin (K-th minus (K+1)-th score): tokens (#), flipped (x)"]
        for d in range(lo, hi + 1):
            n = int(np.count_nonzero(decade == d))
            f = int(np.count_nonzero(flipped & (decade == d)))
            lines.append(f"  1e{d:<+4d}{'x' * round(f / scale)}{'#' * round((n - f) / scale)} "
                         f"{n} ({f} flipped)")
        return _emit("\n".join(lines))
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    edges = np.linspace(logm.min(), logm.max() + 1e-9, bins + 1)
    ax.hist([logm[flipped], logm[~flipped]], bins=edges, stacked=True,
            color=["tab:red", "tab:blue"],
            label=[f"changed experts ({int(flipped.sum())})", f"same experts ({int((~flipped).sum())})"])
    ax.set_xlabel("log10 top-K margin (K-th minus (K+1)-th float32 score)")
    ax.set_ylabel("tokens")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def rank_load_bars(loads: Mapping[str, Sequence[float]], path: str, *, title: str,
                   ylabel: str = "rows into the rank's experts") -> Any:
    """Load per rank side by side for several placements (a dict label -> `[P]` loads, e.g.
    before and after EPLB), with each one's mean as a dashed line (perfect balance).

    Text version: one bar of '#' per rank and placement, with the max / mean ratio.
    """
    items = {k: _values(f"loads[{k!r}]", v) for k, v in _mapping("loads", loads).items()}
    P = max(len(v) for v in items.values())
    if not have_matplotlib():
        top = max(max(v) for v in items.values()) or 1.0
        lines = [f"{title} ({ylabel})"]
        for label, v in items.items():
            mean = float(np.mean(v))
            lines.append(f"{label}: max / mean = {max(v) / mean if mean else 0:.2f}")
            lines += [f"  rank {r:<3d}{'#' * round(50 * x / top)} {x:g}" for r, x in enumerate(v)]
        return _emit("\n".join(lines))
    fig = _figure(max(5.0, 1.0 + 0.8 * P), 4.0)
    ax = fig.add_subplot()
    width = 0.8 / len(items)
    for i, (label, v) in enumerate(items.items()):
        xs = np.arange(len(v)) + (i - (len(items) - 1) / 2) * width
        mean = float(np.mean(v))
        bars = ax.bar(xs, v, width, label=f"{label} (max / mean {max(v) / mean if mean else 0:.2f})")
        ax.axhline(mean, color=bars.patches[0].get_facecolor(), ls="--", lw=1)
    ax.set_xticks(np.arange(P))
    ax.set_xlabel("rank")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


# ------------------------------------------------------------------ dynamic K (top_p)

def experts_per_token_picture(routing: Routing, path: str, *, max_tokens: int = 64) -> Any:
    """Top-p routing (route(..., top_p=p)): how many experts each token took. Left, one bar per
    token (kept pairs dark, pairs taken but dropped past capacity light); right, the histogram
    of K over all T tokens. A plain top-K routing draws K for every token.

    Text version: one row per token, '#' per kept expert, 'x' per dropped one, then K.
    """
    routing = _routing("routing", routing)
    max_tokens = _checks.integer("max_tokens", max_tokens, low=1)
    T, K = routing.num_tokens, routing.k
    taken = routing.experts_per_token  # [T]
    kept = np.count_nonzero(routing.kept, axis=-1)  # [T]
    n = min(T, max_tokens)
    p = routing.options.top_p
    head = (f"experts per token ({'top-p, p = ' + format(p, 'g') if p is not None else 'top-K'}"
            f", at most K = {K}): mean {taken.mean() if T else 0:.2f} over {T} tokens")
    if not have_matplotlib():
        lines = [head + "; # kept, x dropped"]
        for t in range(n):
            lines.append(f"  t{t:<4d}{'#' * int(kept[t])}{'x' * int(taken[t] - kept[t])} "
                         f"{int(taken[t])}")
        return _emit("\n".join(lines))
    fig = _figure(8.8, 3.8)
    left, right = fig.subplots(1, 2, width_ratios=[2.2, 1])
    ts = np.arange(n)
    left.bar(ts, kept[:n], color="tab:blue", label="kept")
    left.bar(ts, (taken - kept)[:n], bottom=kept[:n], color="tab:orange",
             label="dropped (past capacity)")
    left.set_xlabel("token" + (f" (first {n} of {T})" if n < T else ""))
    left.set_ylabel("experts taken")
    left.set_yticks(range(K + 1))
    left.set_title(head, fontsize=10)
    left.legend(fontsize=8, loc="upper right")
    counts = np.bincount(taken, minlength=K + 1)  # [K + 1]
    right.bar(np.arange(K + 1), counts, color="tab:green")
    right.set_xticks(range(K + 1))
    right.set_xlabel("experts per token")
    right.set_ylabel("tokens")
    right.set_title("histogram of K", fontsize=10)
    return _save(fig, path)


# ------------------------------------------------------------------ Soft MoE

def soft_moe_picture(layer: Any, path: str, *, sequence: int = 0, max_tokens: int = 32) -> Any:
    """A pymoe.SoftMoELayer's last forward: the dispatch weights (each slot's softmax over the
    tokens: columns sum to 1) and the combine weights (each token's softmax over the E*S slots:
    rows sum to 1) of one sequence, tokens down, slots across, grouped by expert.

    Text version: both matrices, two decimals, one row per token.
    """
    from .soft_moe import SoftMoELayer

    if not isinstance(layer, SoftMoELayer):
        raise TypeError(f"layer: expected a pymoe.SoftMoELayer, got {type(layer).__name__}")
    if layer.dispatch_weights is None or layer.combine_weights is None:
        raise ValueError("layer: has no forward pass to draw yet; call layer(x) first")
    B = layer.dispatch_weights.shape[0]
    b = _checks.integer("sequence", sequence, low=0, high=B - 1)
    max_tokens = _checks.integer("max_tokens", max_tokens, low=1)
    dispatch = np.asarray(layer.dispatch_weights[b], dtype=float)  # [N, ES]
    combine = np.asarray(layer.combine_weights[b], dtype=float)  # [N, ES]
    N, ES = dispatch.shape
    E, S = layer.num_experts, layer.num_slots
    n = min(N, max_tokens)
    labels = [f"{e}.{s}" for e in range(E) for s in range(S)]
    if not have_matplotlib():
        lines = []
        for name, m in (("dispatch (columns sum to 1)", dispatch),
                        ("combine (rows sum to 1)", combine)):
            lines += [f"Soft MoE {name}; slots expert.slot", "token  " + " ".join(
                f"{lab:>5s}" for lab in labels)]
            lines += [f"t{t:<5d}" + " ".join(f"{v:5.2f}" for v in m[t]) for t in range(n)]
        return _emit("\n".join(lines))
    fig = _figure(2.4 + 2 * max(2.6, 0.42 * ES), 1.9 + 0.24 * n)
    axes = fig.subplots(1, 2)
    for ax, m, title in ((axes[0], dispatch, "dispatch: each slot's mix of\nthe tokens "
                          "(columns sum to 1)"),
                         (axes[1], combine, "combine: each token's mix of\nthe slots "
                          "(rows sum to 1)")):
        im = ax.imshow(m[:n], aspect="auto", cmap="Blues", vmin=0, vmax=max(m.max(), 1e-12))
        for e in range(1, E):
            ax.axvline(e * S - 0.5, color="black", lw=1)
        ax.set_xticks(range(ES), labels, fontsize=7, rotation=90 if ES > 12 else 0)
        ax.set_xlabel("slot (expert.slot)")
        ax.set_ylabel("token")
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.05)
    return _save(fig, path)
