"""Every example runs end to end in --quick mode, writes its pictures, and shows what it claims.

The examples are imported and their main() called: the checks read the numbers they return,
never the text they print.
"""
import importlib.util
import os

import numpy as np
import pytest

from conftest import REPO
from test_viz import assert_png_matches

EXAMPLES = os.path.join(REPO, "examples")


def load(name: str):
    spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(EXAMPLES, name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def check_pictures(result, tmp_path, count):
    figs = result["pictures"]
    assert len(figs) == count
    pytest.importorskip("matplotlib", reason="matplotlib is in the test extra")
    for path, fig in figs.items():
        assert path.startswith(str(tmp_path))
        assert_png_matches(__import__("pathlib").Path(path), fig)


def test_01_walkthrough(tmp_path, capsys):
    res = load("01_walkthrough.py").main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    for step in ("1. router_logits", "6. choice-major", "7. cumulative sum", "9. drop",
                 "10. dispatch_mask", "12. load-balancing loss", "Indexed form", "Speed:"):
        assert step in out
    r = res["routing"]
    assert r.dropped_fraction > 0  # the tiny case is built to drop something
    assert "numpy" in res["times"]
    check_pictures(res, tmp_path, 3)


def test_02_capacity(tmp_path):
    res = load("02_capacity.py").main(["--quick", "--out", str(tmp_path)])
    r = res["results"]
    for kind in ("balanced", "skewed"):
        drops = r[(kind, "choice")]["dropped"]
        assert all(a >= b for a, b in zip(drops, drops[1:]))  # more capacity, fewer drops
        assert drops == r[(kind, "score")]["dropped"]  # priority decides which, not how many
    assert all(s >= b for s, b in zip(r[("skewed", "choice")]["dropped"],
                                      r[("balanced", "choice")]["dropped"]))
    # At tight capacity (factor 0.5) batch-prioritised routing loses less routing weight, and
    # the tokens it drops whole are the less confident ones.
    assert r[("skewed", "score")]["lost_weight"][0] < r[("skewed", "choice")]["lost_weight"][0]
    assert r[("skewed", "score")]["lost_confidence"][0] < r[("skewed", "choice")]["lost_confidence"][0]
    check_pictures(res, tmp_path, 4)


def test_03_train_learns_and_the_aux_loss_evens_the_load(tmp_path):
    res = load("03_train.py").main(["--quick", "--out", str(tmp_path)])
    hist, results = res["history"], res["results"]
    for name, h in hist.items():  # every model learns: the loss falls at least tenfold
        assert h["loss"][-1] < h["loss"][0] / 10, name
        assert results[name]["test_acc"] > 0.85, name
    with_aux, without = hist["MoE, aux loss 0.1"]["load_cv"][-1], hist["MoE, aux loss 0"]["load_cv"][-1]
    assert with_aux < 0.5 * without  # same seed, same data: the aux loss halves the imbalance
    counts = res["class_expert"]
    assert counts.sum() == len(results["MoE, aux loss 0.1"]["routing"].expert_index)
    assert (counts.max(axis=1) / counts.sum(axis=1)).mean() > 0.5  # experts specialise
    check_pictures(res, tmp_path, 4)


def test_04_speed(tmp_path, c_backend):
    res = load("04_speed.py").main(["--quick", "--out", str(tmp_path)])
    impls = {r.impl for r in res["rows"]}
    assert {"np.copyto", "numpy indexed", "C 1 thread"} <= impls
    assert all(r.ms > 0 for r in res["rows"])
    assert set(res["speedups"]["C 1 thread"]) == {"dispatch", "combine", "dispatch_bwd",
                                                  "combine_bwd"}
    check_pictures(res, tmp_path, 1)


def test_examples_fall_back_to_text_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYMOE_VIZ_TEXT", "1")
    res = load("01_walkthrough.py").main(["--quick", "--out", str(tmp_path)])
    assert not any(os.path.exists(p) for p in res["pictures"])
    out = capsys.readouterr().out
    assert "pip install 'pymoe-routing[viz]'" in out and "x = dropped" in out


def test_training_falls_back_to_synthetic_data_without_sklearn(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn") or name.startswith("tqdm"):
            raise ImportError(f"no module named {name}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    monkeypatch.setenv("PYMOE_VIZ_TEXT", "1")
    res = load("03_train.py").main(["--quick", "--out", str(tmp_path), "--epochs", "4"])
    assert res["data"].startswith("synthetic")
    h = res["history"]["MoE, aux loss 0.1"]["loss"]
    assert h[-1] < h[0]
    assert np.isfinite(h).all()


def test_04_speed_includes_the_cuda_rows_when_a_cuda_backend_exists(tmp_path, monkeypatch,
                                                                     cuda_emulator_path):
    """Run against the CPU emulation of the CUDA library: the GPU branch of the example runs."""
    import pymoe

    monkeypatch.setenv("PYMOE_CUDA_LIB", cuda_emulator_path)
    monkeypatch.setenv("PYMOE_VIZ_TEXT", "1")
    be = pymoe.get_backend("cuda")
    with be.block_size(32):  # the emulator runs each CUDA thread as a fiber: keep blocks small
        res = load("04_speed.py").main(["--quick", "--out", str(tmp_path)])
    cuda = [r for r in res["rows"] if r.impl.startswith("CUDA")]
    assert {r.op for r in cuda} == {"router", "slots", "dispatch", "combine", "dispatch_bwd",
                                    "combine_bwd"}
