"""Every example runs end to end in --quick mode, writes its pictures, and shows what it claims.

The examples are imported and their main() called: the checks read the numbers they return,
never the text they print.
"""
import importlib.util
import os

import numpy as np
import pytest

from helpers import REPO, assert_png_matches, import_optional, layout_problems
from pymoe.bench.cpu import COPY

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


def test_00_why_counts_published_models():
    res = load("00_why.py").main([])
    w = res["walkthrough"]
    assert (w["total"], w["active"]) == (468, 248)  # 4*110 + 28 and 2*110 + 28
    # The published totals: Mixtral-8x7B 46.7B stored / 12.9B active; DeepSeek-V3 671B / 37B
    # (its report rounds 37.6B of routed + shared + always-on parameters down).
    m = res["models"]
    assert round(m["Mixtral-8x7B"]["total"] / 1e9, 1) == 46.7
    assert round(m["Mixtral-8x7B"]["active"] / 1e9, 1) == 12.9
    assert round(m["DeepSeek-V3"]["total"] / 1e9) == 671
    assert 37 <= m["DeepSeek-V3"]["active"] / 1e9 < 38


def test_01_walkthrough(tmp_path, capsys):
    res = load("01_walkthrough.py").main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    for step in ("1. router_logits", "6. choice-major", "7. cumulative sum", "9. drop",
                 "10. dispatch_mask", "12. load-balancing loss", "f_e * P_e", "Indexed form",
                 "per-token loop", "argsort", "Speed:"):
        assert step in out
    r = res["routing"]
    assert r.dropped_fraction > 0  # the tiny case is built to drop something
    # The per-token loop of the papers and the vectorised recipe agree, with and without capacity.
    assert res["loop"]["with_capacity"] < 1e-12 and res["loop"]["dropless"] < 1e-12
    assert "numpy indexed" in res["times"]
    check_pictures(res, tmp_path, 3)
    # The closing line names every file it wrote (it once said only "saved under DIR/").
    line = next(line for line in out.splitlines() if line.startswith("Pictures of this routing"))
    assert line == "Pictures of this routing: " + ", ".join(res["pictures"])
    assert [os.path.basename(p) for p in res["pictures"]] == [
        "01_routing_heatmap.png", "01_dispatch_combine.png", "01_expert_load.png"]


@pytest.mark.parametrize("args", [["--k", "1"], ["--k", "3", "--normalize"]])
def test_01_walkthrough_options(tmp_path, capsys, args):
    res = load("01_walkthrough.py").main(args + ["--quick", "--out", str(tmp_path)])
    r = res["routing"]
    assert r.k == int(args[1]) and r.normalize == ("--normalize" in args)
    assert res["loop"]["with_capacity"] < 1e-12 and res["loop"]["dropless"] < 1e-12
    if r.normalize:
        kept_all = r.kept.all(axis=1)
        np.testing.assert_allclose(r.gate_before_drop.sum(axis=1), 1.0, rtol=1e-12)
        assert kept_all.any()


def test_per_token_loop_catches_a_wrong_priority():
    """The loop is an oracle, not a copy: token-major capacity counting gives other drops."""
    w = load("01_walkthrough.py")
    case = w.tiny_case()
    r = w.pymoe.route(w.router_logits(case["x"], case["w_router"], case["b_router"]), 2,
                      w.CAPACITY_FACTOR)
    ein = w.dispatch_indexed(case["x"], r.slot_owner, 2)
    out, _ = w.experts_forward(ein, case["w1"], case["b1"], case["w2"], case["b2"], "relu")
    y = w.combine_indexed(out, r.expert_index, r.position, r.gate)
    assert np.abs(w.per_token_loop(case, 2, False, r.capacity) - y).max() < 1e-12
    assert np.abs(w.per_token_loop(case, 2, False, r.capacity - 1) - y).max() > 1e-3


@pytest.mark.parametrize("k, normalize", [(2, False), (1, False), (1, True), (3, True)])
def test_01b_backward(k, normalize):
    res = load("01b_backward.py").main(["--k", str(k)] + (["--normalize"] if normalize else []))
    for name, (analytic, numeric) in res["checks"].items():
        assert abs(analytic - numeric) <= 1e-6 * max(abs(analytic), abs(numeric), 1e-8), name
    lhs, rhs = res["adjoint"]
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs))
    task = np.abs(res["dlogits_task"]).max()
    if k == 1 and normalize:
        assert task < 1e-14  # gate = 1 exactly: the task gives the router nothing
        assert np.abs(res["dlogits"]).max() > 1e-4  # the aux loss still does
    else:
        assert task > 1e-3


def test_02_capacity(tmp_path, capsys):
    res = load("02_capacity.py").main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    # Where no token was lost whole the mean top-1 probability is '-', not 'nan / nan'.
    assert "nan" not in out
    sc = res["results"][("skewed", "choice")]["lost_confidence"]
    assert not np.isfinite(sc[-1])  # this sweep reaches a factor where nothing is lost whole
    rows = [line for line in out.splitlines() if line.startswith(f"{res['factors'][-1]:6.3f}")]
    assert len(rows) == 1 and "|      - /      - |" in rows[0]
    assert "(their top-1 prob: - where no token lost every choice)" in out
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
    # The other cost of capacity: padding grows with the factor; at factor 1.0 there are exactly
    # K*T slots, so the padded slots equal the dropped pairs.
    for kind in ("balanced", "skewed"):
        pad, drops = r[(kind, "choice")]["padded"], r[(kind, "choice")]["dropped"]
        assert all(a <= b + 1e-12 for a, b in zip(pad, pad[1:]))
        i1 = list(res["factors"]).index(1.0)
        assert pad[i1] == pytest.approx(drops[i1], abs=1e-12)
    assert r[("skewed", "choice")]["padded"][0] > 0.1  # a skewed router pads even when tight
    check_pictures(res, tmp_path, 4)


def test_03_train_learns_and_the_aux_loss_evens_the_load(tmp_path):
    res = load("03_train.py").main(["--quick", "--out", str(tmp_path)])
    hist, results = res["history"], res["results"]
    for name, h in hist.items():  # every model learns: the loss falls at least tenfold
        assert h["loss"][-1] < h["loss"][0] / 10, name
        assert results[name]["test_acc"] > 0.85, name
    with_aux, without = hist["MoE, aux loss 0.1"]["load_cv"][-1], hist["MoE, aux loss 0"]["load_cv"][-1]
    assert with_aux < 0.5 * without  # same seed, same data: the aux loss halves the imbalance
    assert all(len(v) == 2 for v in res["accuracy"].values())  # quick mode: two seeds
    assert all(0.85 < a <= 1 for v in res["accuracy"].values() for a in v)
    # The load picture routes the test set with the training capacity, so C is a real limit.
    tr = results["MoE, aux loss 0"]["train_routing"]
    assert tr.capacity < tr.num_tokens
    counts = res["class_expert"]
    assert counts.sum() == len(results["MoE, aux loss 0.1"]["routing"].expert_index)
    assert (counts.max(axis=1) / counts.sum(axis=1)).mean() == pytest.approx(res["top_share"])
    assert res["top_share"] > 0.5  # experts specialise: most of a digit goes to one expert
    for name, info in res["information"].items():  # far above what shuffled digits show
        assert min(info) > 5 * res["chance_information"][name], name
    assert all(0 <= i <= 2 for v in res["information"].values() for i in v)  # log2 E = 2 bits
    # the aux-free bias evens the load without any aux loss, better than aux loss 0 does
    free = hist["MoE, aux-free bias 0.01"]
    assert free["load_cv"][-1] < 0.5 * without
    # the LoadTracker: one entry per epoch, its CV the one printed, MaxVio >= 0, no dead expert
    t = free["tracker"]
    assert t.steps().tolist() == list(range(12)) and t.loads().shape == (12, 4)
    n_train = t.stats(0).tokens  # every training image once an epoch, in batches of 64
    assert t.stats(11).tokens == n_train and t.stats(0).routings == -(-n_train // 64)
    np.testing.assert_array_equal(t.series("cv"), free["load_cv"])
    assert (t.series("max_vio") >= 0).all() and t.series("dead").max() == 0
    check_pictures(res, tmp_path, 5)


def test_03_train_mutual_information():
    mod = load("03_train.py")
    assert mod.mutual_information(np.eye(4) * 10) == pytest.approx(2.0)  # expert = class
    assert mod.mutual_information(np.ones((10, 4))) == pytest.approx(0.0, abs=1e-12)
    assert mod.mutual_information(np.array([[5, 5, 0], [0, 0, 10]])) == pytest.approx(1.0)


def test_03_train_evaluates_dropless():
    """evaluate() routes with capacity_factor None, and gives the layer its options back."""
    mod = load("03_train.py")
    layer = mod.pymoe.MoELayer(8, 4, 4, 2, 0.5, dtype=np.float64, seed=0)
    model = mod.Classifier(6, 8, 10, layer, 0)
    x = np.random.default_rng(0).normal(size=(64, 6))
    _, r = mod.evaluate(model, x, np.zeros(64, dtype=np.int64))
    assert r.dropped_fraction == 0 and r.options.capacity_factor is None
    assert layer.options.capacity_factor == 0.5
    assert mod.routed_like_training(model, x).dropped_fraction > 0  # factor 0.5 must drop


def test_03b_stability_and_cost(tmp_path):
    mod = load("03b_stability_and_cost.py")
    res = mod.main(["--quick", "--out", str(tmp_path)])
    runs = res["stability"]["runs"]
    low, plain = runs["lr 0.003 (03's), neither"], runs["lr 0.03, neither"]
    zl, jit = runs["lr 0.03, z-loss 1e-3"], runs["lr 0.03, jitter 1e-2"]
    # Ten times the learning rate drives the logits up; the z-loss holds their level down ...
    assert plain["epoch_max"][-1] > 5 * low["epoch_max"][-1]
    assert zl["epoch_max"][-1] < 0.75 * plain["epoch_max"][-1]
    assert zl["routing"].z_loss < 0.5 * plain["routing"].z_loss
    # ... but not their spread: the lowest logit falls as far as without it.
    assert zl["routing"].router_logits.min() < 0.5 * plain["routing"].router_logits.min()
    # Jitter moves some first choices in training, and only where it is on.
    for name, run in runs.items():
        assert (run["jitter_moved"] > 0) == (mod.RUNS[name][2] > 0), name
    assert jit["jitter_moved"] < 0.05  # only the tokens near a tie
    assert mod.bf16_step(100.0) == 0.5 and mod.bf16_step(6.0) == 2 ** -5
    assert mod.to_bfloat16(np.array([100.3]))[0] == 100.5  # 8 significant bits
    # (b): the all-to-all of one exchange is K*D bf16 values per token (Mixtral: 2*4096*2 B).
    costs = res["costs"]["models"]
    assert costs["Mixtral-8x7B"]["exchange_bytes"] == 2 * 4096 * 2
    assert costs["DeepSeek-V3"]["exchange_bytes"] == 8 * 7168 * 2
    bal = res["costs"]["balance"]
    assert bal["skewed"]["dropped"] > bal["balanced"]["dropped"]
    assert bal["skewed"]["straggle"] > bal["balanced"]["straggle"] >= 1
    # (c): distinct experts touched grow with T from K (T=1) and reach E for Mixtral; a skewed
    # router touches fewer; the measured iid curve follows E * (1 - (1 - K/E)^T).
    dec = res["decode"]
    for name, E, K in (("Mixtral-8x7B", 8, 2), ("DeepSeek-V3", 256, 8)):
        iid, skew = dec["curves"][name]["iid"], dec["curves"][name]["skewed"]
        assert iid[0] == K and np.all(np.diff(iid) >= 0) and np.all(skew <= iid + 1e-9)
        for T in (4, 16, 64):
            assert iid[T - 1] == pytest.approx(mod.expected_distinct(E, K, T), rel=0.05)
    assert dec["curves"]["Mixtral-8x7B"]["iid"][-1] == 8  # all E experts at T = 64
    reads = dec["reads"]["DeepSeek-V3"]
    assert reads[64] > 10 * reads[1]  # bytes per step grow towards the total weights
    assert dec["fewer_k"][2] < dec["fewer_k"][4] < dec["fewer_k"][8]
    assert dec["expert_parallel"]["Mixtral-8x7B"] == (8, 1.0)  # one expert per device
    assert dec["drops"][1][0] == 0 and dec["drops"][16][0] > 0  # a capacity drops in decode
    check_pictures(res, tmp_path, 2)
    assert all(layout_problems(fig) == [] for fig in res["pictures"].values())  # text fits


def test_every_example_run_all_runs_is_tested_here():
    names = load("run_all.py").EXAMPLES
    assert names.index("03b_stability_and_cost.py") == names.index("03_train.py") + 1
    source = open(__file__, encoding="utf-8").read()
    assert not [n for n in names if f'load("{n}")' not in source]


def test_04_speed(tmp_path, c_backend):
    res = load("04_speed.py").main(["--quick", "--out", str(tmp_path)])
    impls = {r.impl for r in res["rows"]}
    assert {COPY, "numpy indexed", "C 1 thread"} <= impls
    assert all(r.ms > 0 for r in res["rows"])
    assert set(res["speedups"]["C 1 thread"]) == {"dispatch", "combine", "dispatch_bwd",
                                                  "combine_bwd"}
    check_pictures(res, tmp_path, 1)


def test_07_variants_every_variant_on_the_walkthrough_tokens(tmp_path, capsys):
    mod = load("07_variants.py")
    res = mod.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert set(res["routings"]) == set(mod.VARIANTS)
    for name in mod.VARIANTS:
        assert f"== {name} " in out
    ec = res["routings"]["expert_choice"]
    assert ec.k == 4 and (ec.expert_load_kept == ec.capacity).all()
    assert len(set(res["routings"]["top_p"].experts_per_token.tolist())) > 1
    check_pictures(res, tmp_path, 4)
    one = mod.main(["--variant", "sinkhorn", "--out", str(tmp_path)])  # full arrays, one variant
    assert list(one["routings"]) == ["sinkhorn"] and one["pictures"] == {}
    assert "t7" in capsys.readouterr().out


def test_examples_fall_back_to_text_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYMOE_VIZ_TEXT", "1")
    res = load("01_walkthrough.py").main(["--quick", "--out", str(tmp_path)])
    assert not any(os.path.exists(p) for p in res["pictures"])
    out = capsys.readouterr().out
    assert "pip install 'pymoe-routing[viz]'" in out and "x = dropped" in out
    # It says that it writes nothing, and names the files it would have written.
    line = next(line for line in out.splitlines() if line.startswith("Pictures of this routing"))
    assert "as text, no files written" in line and all(p in line for p in res["pictures"])


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
    assert {r.op for r in cuda} == {"softmax_top_k", "top_k", "slots", "dispatch", "combine", "dispatch_bwd",
                                    "combine_bwd"}


def test_05_conventions(tmp_path):
    import pymoe

    res = load("05_conventions.py").main(["--quick", "--out", str(tmp_path)])
    shipped, shared = res["shipped"], res["shared"]
    rows = {r.name: r for r in shipped.rows}
    assert set(rows) | set(r.name for r in res["top1"].rows) == set(pymoe.presets())
    for name in ("mixtral", "megatron", "qwen3-moe", "deepseek-v3"):  # dropless as shipped
        assert rows[name].dropped_fraction == 0
    assert rows["gshard"].dropped_fraction > rows["deepspeed-top2"].dropped_fraction  # K left out
    shared_rows = {r.name: r for r in shared.rows}
    # the same slots per expert, the same number dropped, different pairs and gates
    assert shared_rows["megatron"].capacity == shared_rows["deepspeed-topk"].capacity
    assert shared_rows["megatron"].dropped_fraction == shared_rows["mixtral"].dropped_fraction
    assert shared_rows["megatron"].differs["dropped"] > 0
    assert shared_rows["qwen2-moe"].differs["gate"] > 0 and shared_rows["gpt-oss"].differs == {
        "expert": 0, "dropped": 0, "gate": 0}
    assert shared_rows["mixtral"].aux_loss == pytest.approx(2 * shared_rows["megatron"].aux_loss)
    g = res["porting"]["gates"]
    assert g["deepspeed-top2"][0] == pytest.approx(1.0) and g["gshard"][0] < 1
    assert g["flaxformer"][0] == pytest.approx(res["porting"]["probs"][0], abs=1e-3)
    check_pictures(res, tmp_path, 2)


def test_08_hf_block(tmp_path):
    import_optional("transformers", "crosscheck", module_level=False)
    res = load("08_hf_block.py").main(["--quick", "--out", str(tmp_path)])
    for family in ("mixtral", "deepseek_v3", "qwen3_moe"):
        r = res[family]
        assert r["state_exact"]
        for run in (r["from_transformers"], r["load_bf16"]):
            assert run["chosen_same"] == run["T"] == 32
            # HF computes these routers in float32: float32 round-off is the floor
            assert max(run["y"], run["dx"], run["grads"]) < 2e-5
    check_pictures(res, tmp_path, 4)


def test_08_hf_block_reads_a_checkpoint(tmp_path):
    import_optional("transformers", "crosscheck", module_level=False)
    ex = load("08_hf_block.py")
    model, _, _ = ex.tiny_block("mixtral")
    model.float().save_pretrained(tmp_path / "ckpt")
    res = ex.main(["--checkpoint", str(tmp_path / "ckpt"), "--layer", "1", "--tokens", "16",
                   "--out", str(tmp_path)])
    assert res["layer"].hf.family == "mixtral"
    assert res["compare"]["chosen_same"] == 16 and res["compare"]["y"] < 2e-5


def test_09_train_serve(tmp_path):
    res = load("09_train_serve.py").main(["--quick", "--out", str(tmp_path)])
    p = res["padding"]
    # the real rows as if alone: the same matmul shapes, so equal here; a tolerance, because
    # nothing in the contract fixes another BLAS kernel's rounding of the two runs
    assert p["gap"] < 1e-12 and p["padding_dx"] == 0  # and no dx on padding
    assert p["aux_plain"] != p["aux_masked"]
    report = res["precision"]["report"]
    assert 0 < report.tokens_flipped < 0.1 * report.tokens  # a few percent flip in bfloat16
    assert report.margins[report.flipped].max() < np.median(report.margins)  # near-ties only
    assert res["replay"]["replayed"] == [0, 0] and res["replay"]["router_grad"] > 0
    g = res["global"]["global"]
    assert g[-1] < min(res["global"]["local"]) and abs(g[-1] - 1) < 0.1
    check_pictures(res, tmp_path, 1)
