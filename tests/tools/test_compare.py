"""pymoe.compare: the table's numbers and the reason for every differing (token, choice) pair; the
command line; the picture."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import pymoe
from helpers import assert_png_matches
from pymoe import viz
from pymoe.compare import REASONS
from pymoe.compare.__main__ import main as cli


def skewed(T: int = 96, E: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(T, E)) - 0.1 * np.arange(E)


def test_rows_match_the_routings():
    logits = skewed()
    c = pymoe.compare(logits, ["megatron", "deepspeed-topk", "tutel", "qwen2-moe"], k=2,
                      capacity_factor=1.0, min_capacity=0)
    assert c.names[0] == "megatron"
    for row in c.rows:
        r = pymoe.route(logits, 2, 1.0, min_capacity=0, preset=row.name)
        assert row.capacity == r.capacity and row.aux_loss == r.aux_loss
        assert row.dropped_fraction == r.dropped_fraction
        assert row.tokens_lost == int((~r.kept.any(axis=1)).sum())
        np.testing.assert_array_equal(c.routings[row.name].position, r.position)
    assert c.rows[0].differs == {why: 0 for why in REASONS}
    assert "megatron" in str(c) and "tokens lost" in c.table()


def test_every_reason_is_what_it_says():
    logits = skewed(seed=3)
    c = pymoe.compare(logits, ["mixtral", "deepseek-v3", "deepspeed-top2", "megablocks"], k=2,
                      capacity_factor=1.0, min_capacity=0)
    ref = c.routings["mixtral"]
    seen = set()
    for name in c.names[1:]:
        r = c.routings[name]
        for t, j, why in c.differences(name):
            seen.add(why)
            same = ref.expert_index[t, j] == r.expert_index[t, j]
            if why == "expert":
                assert not same
            elif why == "dropped":
                assert same and ref.kept[t, j] != r.kept[t, j]
            else:
                assert same and ref.kept[t, j] and r.kept[t, j]
                assert abs(ref.gate[t, j] - r.gate[t, j]) > 1e-6
        agree = c.reason[name] == 0
        np.testing.assert_array_equal(ref.expert_index[agree], r.expert_index[agree])
        np.testing.assert_array_equal(ref.kept[agree], r.kept[agree])
        np.testing.assert_allclose(ref.gate[agree], r.gate[agree], atol=1e-6)
    assert seen == set(REASONS)


def test_literal_reasons():
    """One token, E = 16. Mixtral takes experts 0 and 2 (logits 5 and 4); DeepSeek-V3's group
    limit (8 groups of 2, keep the 4 with the largest sum of sigmoid scores) keeps groups 2-5,
    whose two experts each sit at logit 3, so both its choices are other experts. Qwen2-MoE
    chooses as Mixtral but keeps the raw probabilities: both gates differ. gpt-oss is the same
    routing as Mixtral."""
    logits = np.full((1, 16), -10.0)
    logits[0, [0, 2]] = [5.0, 4.0]
    logits[0, 4:12] = 3.0
    c = pymoe.compare(logits, ["mixtral", "deepseek-v3", "qwen2-moe", "gpt-oss"], k=2,
                      capacity_factor=None)
    assert c.differences("deepseek-v3") == [(0, 0, "expert"), (0, 1, "expert")]
    assert set(c.routings["deepseek-v3"].expert_index[0]) <= set(range(4, 12))
    assert c.differences("qwen2-moe") == [(0, 0, "gate"), (0, 1, "gate")]
    assert c.differences("gpt-oss") == []


def test_defaults_and_errors():
    logits = skewed(T=32)
    c = pymoe.compare(logits)  # every preset, K = 2, each with its own capacity defaults
    assert c.names == pymoe.presets()
    with pytest.raises(ValueError, match="presets: each preset once"):
        pymoe.compare(logits, ["tutel", "tutel"])
    with pytest.raises(ValueError, match="presets: expected at least one"):
        pymoe.compare(logits, [])
    with pytest.raises(ValueError, match="preset: unknown name"):
        pymoe.compare(logits, ["tutel", "tutle"])


def test_command_line(tmp_path, capsys):
    np.save(tmp_path / "logits.npy", skewed(T=40))
    res = cli(["--logits", str(tmp_path / "logits.npy"), "--presets", "megatron,tutel",
               "--capacity-factor", "none", "--k", "2"])
    out = capsys.readouterr().out
    assert "megatron" in out and "tutel" in out and res.rows[0].dropped_fraction == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the top-1 presets at K = 2: said under the table instead
        res = cli(["--tokens", "24", "--capacity-factor", "0.5", "--min-capacity", "1"])
    assert res.names == pymoe.presets() and res.routings["megatron"].options.min_capacity == 1
    assert "note: preset 'switch' is a top-1 gating function" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli(["--capacity-factor", "lots"])
    with pytest.raises(SystemExit):
        cli(["--presets", "nope"])


def test_picture(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is in the viz extra")
    c = pymoe.compare(skewed(), ["mixtral", "megatron", "deepspeed-top2"], k=2,
                      capacity_factor=1.0)
    path = tmp_path / "p.png"
    assert_png_matches(path, viz.preset_differences(c, str(path)))


def test_cli_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is in the viz extra")
    path = tmp_path / "cmp.png"
    cli(["--presets", "mixtral,gshard,megatron", "--capacity-factor", "none",
         "--plot", str(path)])
    assert f"picture: {path}" in capsys.readouterr().out
    assert path.stat().st_size > 5_000


def test_picture_text(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYMOE_VIZ_TEXT", "1")
    c = pymoe.compare(skewed(T=20), ["mixtral", "megatron", "qwen2-moe"], k=2,
                      capacity_factor=1.0)
    text = viz.preset_differences(c, str(tmp_path / "p.png"))
    assert not (tmp_path / "p.png").exists() and text in capsys.readouterr().out
    lines = text.splitlines()
    assert lines[1] == "mixtral          " + "." * 40
    assert set(lines[3].split()[1]) <= set(".G")  # qwen2-moe: raw gates, same experts
    assert "G" in lines[3]
    # It names the capacity the routings share and how many of the tokens it shows.
    assert lines[0].startswith("pairs (token, choice) of all 20 tokens vs 'mixtral'")
    assert "capacity: capacity factor 1.0 for every preset, no minimum C" in lines
