"""pymoe.viz: PNGs of the expected size with matplotlib, readable text without it."""
import sys

import numpy as np
import pytest

import pymoe
from helpers import assert_png_matches, layout_problems
from pymoe import viz
from pymoe.bench.report import Row


@pytest.fixture
def routing():
    logits = np.random.default_rng(0).normal(size=(12, 4)) + np.array([1.0, 0, 0, -0.5])
    return pymoe.route(logits, 2, 0.75)


@pytest.fixture
def rows():
    sec = "T=8 D=4 E=2 K=1"
    return [Row(sec, "dispatch", "numpy indexed", 2.0, 1.5, 0.1),
            Row(sec, "dispatch", "C 2 threads", 0.2, 15.0, 1.1),
            Row("layer forward+backward", "fwd+bwd", "C", 40.0, gflops=100.0)]


@pytest.fixture
def no_matplotlib(monkeypatch):
    """Make `import matplotlib` fail, as on a machine without the viz extra."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not viz.have_matplotlib()


def test_pictures_are_pngs_of_the_figure_size(tmp_path, routing, rows):
    pytest.importorskip("matplotlib", reason="matplotlib is in the viz extra")
    calls = {
        "heat.png": lambda p: viz.routing_heatmap(routing, p),
        "dc.png": lambda p: viz.dispatch_combine_picture(routing, p),
        "load.png": lambda p: viz.expert_load_bars({"a": routing, "b": routing}, p),
        "curve.png": lambda p: viz.curves([0.5, 1, 2], {"x": [0.5, 0.2, 0.0]}, p, title="t",
                                          xlabel="cf", ylabel="drop", reference=(0, "zero")),
        "class.png": lambda p: viz.class_expert_heatmap(np.arange(12).reshape(3, 4), p),
        "bench.png": lambda p: viz.benchmark_bars(rows, p, reference=13.0),
        "loadheat.png": lambda p: viz.load_heatmap({"a": np.arange(24).reshape(6, 4),
                                                    "b": np.ones((6, 4))}, p, steps=range(0, 12, 2)),
        "send.png": lambda p: viz.send_matrices({"a": np.eye(4) * 2048, "b": np.ones((4, 4))},
                                                p, title="bytes"),
    }
    for name, draw in calls.items():
        path = tmp_path / "sub" / name
        fig = draw(str(path))
        assert fig.__class__.__name__ == "Figure"
        assert_png_matches(path, fig)


def test_pictures_fit_their_text(tmp_path, routing, rows, variant_routings):
    """Titles inside the figure, legends off the axis labels (once broken: a clipped expert-choice
    title, the preset legend over the x label of a short comparison)."""
    pytest.importorskip("matplotlib", reason="matplotlib is in the viz extra")
    ec, grouped = variant_routings
    logits = np.random.default_rng(0).normal(size=(128, 16)) - 0.15 * np.arange(16)
    few = pymoe.compare(logits, ["mixtral", "gshard", "megatron"], capacity_factor=None)
    every = pymoe.compare(logits, [n for n in pymoe.presets()
                                   if n not in ("switch", "deepspeed-top1")],
                          capacity_factor=1.0, min_capacity=0)
    series = {f"a long series label number {i}": [0.5 - 0.1 * i, 0.2, 0.0] for i in range(4)}
    calls = {
        "heat": lambda p: viz.routing_heatmap(routing, p),
        "dc": lambda p: viz.dispatch_combine_picture(routing, p),
        "load": lambda p: viz.expert_load_bars({"a": routing, "b": routing}, p),
        "curves": lambda p: viz.curves([0.5, 1, 2], series, p, title="t", xlabel="cf",
                                       ylabel="drop", reference=(0, "zero")),
        "curves below": lambda p: viz.curves([0.5, 1, 2], series, p, title="t", xlabel="cf",
                                             ylabel="drop", reference=(0, "zero"),
                                             legend="below", counts={k: [9, 99, 999]
                                                                     for k in series}),
        "class": lambda p: viz.class_expert_heatmap(np.arange(12).reshape(3, 4), p),
        "load heatmap": lambda p: viz.load_heatmap(np.arange(1, 161).reshape(20, 8) % 7, p),
        "load heatmaps": lambda p: viz.load_heatmap({"aux loss 0.1": np.ones((40, 4)),
                                                     "aux loss 0": np.eye(4)[np.arange(40) % 4],
                                                     "aux-free bias": np.ones((40, 4))}, p),
        "send": lambda p: viz.send_matrices({"a": np.eye(4) * 2048, "b": np.ones((4, 4))},
                                            p, title="bytes"),
        "expert choice": lambda p: viz.expert_choice_picture(ec, p),
        "groups": lambda p: viz.group_limited_picture(grouped, p),
        "3 presets": lambda p: viz.preset_differences(few, p),
        "14 presets": lambda p: viz.preset_differences(every, p),
    }
    for name, draw in calls.items():
        path = tmp_path / f"{name}.png"
        fig = draw(str(path))
        assert_png_matches(path, fig)
        assert layout_problems(fig) == [], name
    with pytest.raises(ValueError, match="legend: expected 'inside' or 'below'"):
        viz.curves([1], {"a": [1]}, str(tmp_path / "x.png"), title="t", xlabel="x", ylabel="y",
                   legend="left")


def test_preset_picture_names_its_capacity_and_tokens(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is in the viz extra")
    logits = np.random.default_rng(0).normal(size=(100, 16))
    c = pymoe.compare(logits, ["mixtral", "gshard"], capacity_factor=1.0, min_capacity=0)
    fig = viz.preset_differences(c, str(tmp_path / "p.png"))
    assert "capacity factor 1.0 for every preset, no minimum C" in fig._suptitle.get_text()
    assert "the first 48 of 100 tokens" in fig.axes[0].get_title()


def test_capacity_setting_in_words():
    logits = np.random.default_rng(0).normal(size=(32, 16))
    names = ["mixtral", "gshard"]
    words = {
        "capacity factor 1.0 for every preset, no minimum C": {"capacity_factor": 1.0,
                                                               "min_capacity": 0},
        "capacity factor 2.0 for every preset, minimum C 3": {"capacity_factor": 2.0,
                                                              "min_capacity": 3},
        "capacity factor 1.0 for every preset, each its own minimum C": {"capacity_factor": 1.0},
        "dropless (no capacity limit) for every preset": {"capacity_factor": None},
        "each preset's own capacity factor (dropless where it is)": {},
    }
    for expected, shared in words.items():
        c = pymoe.compare(logits, names, **shared)
        assert viz.capacity_setting(c.routings) == expected, shared


def test_heatmap_text_marks_kept_and_dropped(no_matplotlib, routing, tmp_path, capsys):
    text = viz.routing_heatmap(routing, str(tmp_path / "h.png"))
    assert not (tmp_path / "h.png").exists()
    assert text in capsys.readouterr().out
    lines = text.splitlines()
    assert lines[1].startswith("token") and len(lines) == 2 + routing.num_tokens + 1
    dropped = int((~routing.kept).sum())
    assert dropped > 0 and sum(line.count("x") for line in lines[2:-1]) == dropped
    assert sum(line.count("1") for line in lines[2:-1]) >= int(routing.kept[:, 0].sum())


def test_load_bars_text(no_matplotlib, routing, tmp_path):
    text = viz.expert_load_bars(routing, str(tmp_path / "l.png"))
    for e in range(4):
        load, kept = routing.expert_load[e], routing.expert_load_kept[e]
        assert f"e{e:<3d}" in text and f" {load} ({load - kept} dropped)" in text
    assert f"C = {routing.capacity}" in text


def test_slot_table_text(no_matplotlib, routing, tmp_path):
    text = viz.dispatch_combine_picture(routing, str(tmp_path / "d.png"))
    assert text.count("expert ") == 4 and "--" in text  # some slot is empty
    t, j = divmod(int(routing.slot_owner[0, 0]), routing.k)
    assert f"t{t}: {routing.gate[t, j]:.2f}" in text


def test_curves_class_and_bench_text(no_matplotlib, rows, tmp_path):
    text = viz.curves([0.5, 1.0], {"skewed": [0.6, 0.3], "balanced": [0.5, 0.0]},
                      str(tmp_path / "c.png"), title="drops", xlabel="cf", ylabel="fraction")
    assert "skewed" in text and "0.6" in text and "0.3" in text
    text = viz.class_expert_heatmap(np.array([[3, 1], [0, 4]]), str(tmp_path / "k.png"))
    assert "75%" in text and "100%" in text
    text = viz.benchmark_bars(rows, str(tmp_path / "b.png"), reference=13.0)
    assert "15.00 GB/s" in text and "40.0 ms" in text and "13.00 GB/s" in text


def test_send_matrices_text(no_matplotlib, tmp_path):
    text = viz.send_matrices({"exact": [[2048, 1024], [0, 512]]}, str(tmp_path / "s.png"),
                             title="bytes sent")
    lines = text.splitlines()
    assert lines[0] == "bytes sent" and "row = sender" in lines[1]
    numbers = [[float(w) for w in line[6:].split() if w[0].isdigit()] for line in lines[3:5]]
    assert numbers == [[2.0, 1.0], [0.0, 0.5]]  # KiB, row = sender


def test_env_switch_forces_text(monkeypatch):
    monkeypatch.setenv("PYMOE_VIZ_TEXT", "1")
    assert not viz.have_matplotlib()


@pytest.fixture
def variant_routings():
    logits = np.random.default_rng(0).normal(size=(10, 4)) + np.array([1.0, 0, 0, -0.5])
    return (pymoe.route(logits, 2, 0.5, selection="experts"),
            pymoe.route(logits, 2, 0.75, score="sigmoid", num_groups=2, topk_groups=1,
                        expert_bias=np.array([0.0, 0.0, 0.2, 0.0])))


def test_variant_pictures_are_pngs(tmp_path, variant_routings):
    pytest.importorskip("matplotlib", reason="matplotlib is in the viz extra")
    ec, grouped = variant_routings
    for name, draw in {"ec.png": lambda p: viz.expert_choice_picture(ec, p),
                       "g.png": lambda p: viz.group_limited_picture(grouped, p)}.items():
        path = tmp_path / name
        assert_png_matches(path, draw(str(path)))


def test_expert_choice_text_counts_experts_per_token(no_matplotlib, variant_routings, tmp_path):
    ec, _ = variant_routings
    text = viz.expert_choice_picture(ec, str(tmp_path / "e.png"))
    rows = text.splitlines()[2:]
    assert len(rows) == 10
    per_token = ec.kept.sum(axis=1)
    for t, row in enumerate(rows):
        assert row.count("#") == per_token[t] and row.endswith(str(per_token[t]))
    assert sum(row.count("#") for row in rows) == 4 * ec.capacity  # every expert full


def test_group_limited_text_marks_the_allowed_groups(no_matplotlib, variant_routings, tmp_path):
    _, grouped = variant_routings
    text = viz.group_limited_picture(grouped, str(tmp_path / "g.png"))
    rows = text.splitlines()[1:]
    assert len(rows) == 10
    for t, row in enumerate(rows):
        cells = row.split("|")[1:3]  # the two groups
        chosen_group = grouped.expert_index[t, 0] // 2
        assert "-" not in cells[chosen_group] and cells[1 - chosen_group].count("-") == 2
    with pytest.raises(ValueError, match="routing: expected a routing made with num_groups"):
        viz.group_limited_picture(variant_routings[0], str(tmp_path / "x.png"))


def test_load_heatmap_text(no_matplotlib, tmp_path):
    """Rows = steps, a shade per expert, the row's max / mean; every few steps past 16 rows, the
    last one always; argument checks name the argument."""
    loads = np.array([[4, 0, 0, 0], [1, 1, 1, 1]] * 10)  # [20, 4]
    text = viz.load_heatmap({"skewed": loads}, str(tmp_path / "h.png"), steps=range(100, 120))
    lines = text.splitlines()
    assert lines[1] == "skewed:" and lines[2].split() == ["step", "0123", "max/mean"]
    assert lines[3].endswith("4.00") and lines[3].split()[0] == "100"
    assert lines[-1].split()[0] == "119" and lines[-1].endswith("1.00")
    assert len(lines) == 3 + 11  # steps 100, 102, ..., 118 and the last, 119
    with pytest.raises(ValueError, match="steps: expected 20 labels"):
        viz.load_heatmap(loads, str(tmp_path / "h.png"), steps=range(3))
    with pytest.raises(ValueError, match="loads: expected every panel to have the same"):
        viz.load_heatmap({"a": loads, "b": loads[:3]}, str(tmp_path / "h.png"))
    with pytest.raises(ValueError, match=r"loads\['a'\]: expected finite non-negative"):
        viz.load_heatmap({"a": -loads}, str(tmp_path / "h.png"))
    with pytest.raises(TypeError, match="loads"):
        viz.load_heatmap("loads", str(tmp_path / "h.png"))
