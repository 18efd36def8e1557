"""The benchmark script runs end to end and counts bytes right (its timings are never asserted)."""
import json
import os

import numpy as np
import pytest

from helpers import REPO
from pymoe.bench import ops, summary
from pymoe.bench.__main__ import main
from pymoe.bench.report import Row
from pymoe.bench.routing import ARGSORT


def test_byte_counts_by_hand():
    p = ops.make_problem(T=8, D=4, E=2, K=1, capacity_factor=1.0, dtype=np.float32)
    assert p.C == 4
    kept = p.kept
    b = ops.op_bytes(p)
    # dispatch: read kept rows, write all E*C slot rows (float32), read E*C int64 owners
    assert b["dispatch"] == (kept * 4 + 2 * 4 * 4) * 4 + 2 * 4 * 8
    # combine: read kept slot rows, write T rows; read index, position (int64) and gate (float32)
    assert b["combine"] == (kept * 4 + 8 * 4) * 4 + 8 * 1 * (8 + 8 + 4)
    assert b["dispatch_bwd"] == b["combine"] - 8 * 1 * 4  # no gate to read


def test_dense_rows_skip_with_a_reason_when_memory_is_short(monkeypatch):
    p = ops.make_problem(T=64, D=8, E=4, K=2, capacity_factor=1.0, dtype=np.float32)
    monkeypatch.setenv("PYMOE_BENCH_DENSE_MAX_GB", "1e-9")
    why = ops.numpy_dense(p)
    assert isinstance(why, str) and "[T, E, C] = [64, 4, 32]" in why and "GB" in why


def test_quick_run_writes_a_complete_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    assert main(["--quick", "--no-routing", "--no-sweep", "--no-gated", "--json", str(out),
                 "--markdown", str(md)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    ops_seen = {(r["op"], r["impl"]) for r in rows if r["ms"] is not None}
    for op in ops.OPS:
        assert (op, "numpy indexed") in ops_seen
        assert (op, "numpy dense") in ops_seen
    timed = [r for r in rows if r["ms"] is not None and r["gbps"] is not None]
    assert timed and all(r["ms"] > 0 and r["gbps"] > 0 and r["x_copy"] > 0 for r in timed)
    layer = [r for r in rows if r["op"] == "fwd+bwd" and r["ms"] is not None]
    assert {"numpy indexed", "numpy dense"} <= {r["impl"] for r in layer}
    assert data["meta"]["copy_gbps"] > 0
    assert md.read_text().startswith("| problem | op | impl |")
    printed = capsys.readouterr().out
    assert "copy bandwidth" in printed and "dispatch" in printed


def test_quick_run_includes_c_rows(c_backend, tmp_path):
    out = tmp_path / "bench.json"
    main(["--quick", "--no-dense", "--no-torch", "--no-layer", "--no-routing", "--no-sweep",
          "--no-gated", "--json", str(out)])
    impls = {r["impl"] for r in json.loads(out.read_text())["rows"] if r["ms"] is not None}
    assert "C 1 thread" in impls


def test_plot_is_drawn_when_matplotlib_is_there(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is in the test extra")
    png = tmp_path / "bench.png"
    main(["--quick", "--no-dense", "--no-torch", "--no-routing", "--no-sweep", "--no-gated",
          "--plot", str(png)])
    assert png.stat().st_size > 10_000


def test_out_dir_routing_sweep_and_readme_summary(c_backend, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:summary -->\nold\n<!-- /bench:summary -->\nrest\n")
    out = tmp_path / "bench"
    assert main(["--quick", "--no-torch", "--no-layer", "--no-gated", "--out", str(out),
                 "--readme", str(readme)]) == 0
    for name in ("cpu.txt", "cpu.json", "cpu.md"):
        assert (out / name).stat().st_size > 0
    rows = json.loads((out / "cpu.json").read_text())["rows"]
    route = {(r["section"].split(" capacity")[0], r["impl"]) for r in rows if r["op"] == "route"}
    for E, K in ((64, 2), (256, 8)):
        sec = f"route(): T=2048 E={E} K={K}"
        assert {(sec, "numpy (reference)"), (sec, "C 1 thread"), (sec, ARGSORT)} <= route
    sweep = {(r["T"], r["impl"]) for r in rows if r["T"] is not None and r["ms"] is not None}
    assert {(T, "numpy indexed") for T in (256, 512, 1024)} <= sweep
    assert {(T, "numpy dense") for T in (256, 512, 1024)} <= sweep
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert "route() in C at T=2048 E=256 K=8" in text
    assert "the time of a stable argsort of the logits" in text  # the 0.15x yardstick
    assert "- C's speed-up over the NumPy reference, same run: route() " in text
    assert "dispatch + combine " in text.split("same run:", 1)[1].split("\n", 1)[0]
    # the same lines again from the saved rows, without measuring
    again = tmp_path / "again.md"
    again.write_text("<!-- bench:summary -->\n<!-- /bench:summary -->\n")
    assert summary.main([str(out / "cpu.json"), "--readme", str(again)]) == 0
    assert again.read_text().split("\n")[1:-2] == text.split("<!-- bench:summary -->\n")[1].split(
        "\n<!-- /bench:summary -->")[0].split("\n")


def test_c_vs_numpy_line_by_hand():
    rows = [Row("route(): T=8 E=4 K=2 capacity_factor=1.25", "route", "numpy (reference)", 70.0),
            Row("route(): T=8 E=4 K=2 capacity_factor=1.25", "route", "C 2 threads", 10.0),
            Row("T=8 D=4 E=4 K=2 capacity_factor=1.25", "dispatch", "numpy indexed", 30.0),
            Row("T=8 D=4 E=4 K=2 capacity_factor=1.25", "combine", "numpy indexed", 20.0),
            Row("T=8 D=4 E=4 K=2 capacity_factor=1.25", "dispatch", "C 2 threads", 6.0),
            Row("T=8 D=4 E=4 K=2 capacity_factor=1.25", "combine", "C 2 threads", 4.0),
            Row("layer forward+backward: T=8 D=4 H=8 E=4 K=2 capacity_factor=1.25", "fwd+bwd",
                "numpy indexed", 1246.0),
            Row("layer forward+backward: T=8 D=4 H=8 E=4 K=2 capacity_factor=1.25", "fwd+bwd", "C",
                1170.0, note="1.10x the sgemm-rate time")]
    lines = summary.summary_lines(rows)
    assert lines[0] == ("- C's speed-up over the NumPy reference, same run: route() 7.0x (1 shape), "
                        "dispatch + combine 5.0x (1 shape), a whole layer forward+backward 1.06x "
                        "(1 shape)")
    assert "1170.0 ms, 1.06x speed-up over the NumPy layer (1246.0 ms)" in lines[-1]


def test_readme_summary_is_the_committed_runs():
    """README's bench block is what the committed run's rows give (docs/bench/cpu.json)."""
    with open(os.path.join(REPO, "docs", "bench", "cpu.json"), encoding="utf-8") as f:
        rows = [Row(**r) for r in json.load(f)["rows"]]
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    block = readme.split(summary.START + "\n", 1)[1].split("\n" + summary.END, 1)[0]
    assert block.split("\n") == summary.summary_lines(rows), (
        "README's summary is not docs/bench/cpu.json's: python -m pymoe.bench.summary "
        "docs/bench/cpu.json --readme README.md")


def test_cuda_benchmark_script_runs_on_the_emulator(cuda_emulator_path, monkeypatch, tmp_path):
    """--backend cuda end to end on the CPU emulation (this checks the script, not GPU speed)."""
    monkeypatch.setenv("PYMOE_CUDA_LIB", cuda_emulator_path)
    out = tmp_path / "cuda.json"
    assert main(["--backend", "cuda", "--quick", "--block-size", "32", "64",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["op"] for r in rows} == {"softmax_top_k", "top_k", "slots", *ops.OPS}
    assert {r["impl"] for r in rows} == {"CUDA (block 32)", "CUDA (block 64)"}
    assert all(r["ms"] > 0 for r in rows)


def test_cuda_benchmark_without_a_backend_says_why(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PYMOE_CUDA_LIB", str(tmp_path / "absent.so"))
    assert main(["--backend", "cuda", "--quick"]) == 1
    assert "CUDA backend unavailable" in capsys.readouterr().out
