"""The command lines and pymoe.viz on bad input (issue 27): a one-line error naming the flag or the
argument, never a traceback, a silently ignored value or a picture announced but not written.
The CLIs run as subprocesses, as a user runs them."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import pymoe
from helpers import REPO
from pymoe import viz
from pymoe.bench.__main__ import parse as bench_parse


def run(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO, **(env or {})})


def assert_one_line_error(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "error:" in last and all(w in last for w in words), last

# ------------------------------------------------ 12: bench shapes and repeats


@pytest.mark.parametrize("flag", ["--T", "--D"])
def test_bench_zero_shape_is_an_error_not_the_default(flag):
    with pytest.raises(SystemExit):
        bench_parse([flag, "0"])


def test_bench_explicit_values_win_over_quick():
    args = bench_parse(["--quick", "--repeats", "5", "--T", "100"])
    assert args.repeats == 5 and args.T == 100
    assert bench_parse(["--quick"]).repeats == 3 and bench_parse([]).repeats == 7


@pytest.mark.parametrize("argv, words", [
    (["--T", "-4"], ["--T"]), (["--T", "0"], ["--T"]), (["--E", "0"], ["--E"]),
    (["--K", "9", "--E", "4"], ["--K"]), (["--capacity-factor", "-1"], ["--capacity-factor"]),
    (["--repeats", "0"], ["--repeats"]),
])
def test_bench_bad_numbers_are_one_line_errors(argv, words):
    assert_one_line_error(run("pymoe.bench", *argv), *words)

# ------------------------------------------------ compare's command line


@pytest.mark.parametrize("argv, words", [
    (["--tokens", "-5"], ["--tokens"]), (["--experts", "0"], ["--experts"]),
    (["--k", "9", "--experts", "4"], ["k"]), (["--capacity-factor", "-1"], ["capacity_factor"]),
])
def test_compare_bad_numbers_are_one_line_errors(argv, words):
    assert_one_line_error(run("pymoe.compare", *argv), *words)


class Marker:
    """Unpickling this would create a file: the --logits loader must never unpickle."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_compare_logits_files_that_are_not_arrays_are_one_line_errors(tmp_path):
    marker = tmp_path / "unpickled"
    (tmp_path / "empty.npy").write_bytes(b"")
    np.save(tmp_path / "object.npy", np.array([Marker(str(marker)), 1], dtype=object),
            allow_pickle=True)
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps(Marker(str(marker))))
    np.savez(tmp_path / "two.npz", a=np.zeros((4, 4)), b=np.zeros(3))
    for name in ("empty.npy", "object.npy", "plain.pkl", "missing.npy", "two.npz"):
        assert_one_line_error(run("pymoe.compare", "--logits", str(tmp_path / name)),
                              "--logits")
    assert not marker.exists()  # allow_pickle stayed False: no code ran


def test_plot_paths_under_a_regular_file_are_one_line_errors(tmp_path):
    f = tmp_path / "f"
    f.write_text("a file")
    assert_one_line_error(run("pymoe.compare", "--plot", str(f / "p.png")), "--plot", "not a folder")
    assert_one_line_error(run("pymoe.cuda_build", "--out", str(f / "x.so")), "--out",
                          "not a folder")
    assert_one_line_error(run("pymoe.bench", "--quick", "--plot", str(f / "b.png")), "--plot")

# ------------------------------------------------ 13: a picture announced must exist


def test_compare_text_mode_does_not_announce_a_picture(tmp_path):
    out = tmp_path / "p.png"
    proc = run("pymoe.compare", "--tokens", "16", "--plot", str(out), env={"PYMOE_VIZ_TEXT": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not out.exists()
    assert f"picture: {out}\n" not in proc.stdout
    assert "none written" in proc.stderr and "PYMOE_VIZ_TEXT=1" in proc.stderr

# ------------------------------------------------ compare() and preset()


def test_preset_can_be_renamed_for_compare():
    p = pymoe.preset("mixtral", name="mixtral-cf1", capacity_factor=1.0)
    assert p.name == "mixtral-cf1" and p.capacity_factor == 1.0
    logits = np.random.default_rng(0).normal(size=(32, 8))
    assert pymoe.compare(logits, ["mixtral", p]).names == ["mixtral", "mixtral-cf1"]
    with pytest.raises(TypeError, match="name: expected a non-empty str"):
        pymoe.preset("mixtral", name=3)


def test_compare_with_one_string_says_it_wants_a_list():
    with pytest.raises(TypeError, match=r"presets: expected a list of names.*'mixtral'"):
        pymoe.compare(np.zeros((4, 8)), "mixtral")


def test_compare_default_presets_name_the_preset_that_cannot_route():
    with pytest.raises(ValueError, match="deepseek-v3"):
        pymoe.compare(np.random.default_rng(0).normal(size=(8, 4)))

# ------------------------------------------------ viz with bad input


@pytest.mark.parametrize("text", [False, True])
def test_viz_checks_its_arguments(tmp_path, monkeypatch, text):
    if text:
        monkeypatch.setenv("PYMOE_VIZ_TEXT", "1")
    elif not viz.have_matplotlib():
        pytest.skip("matplotlib is not installed")
    png = str(tmp_path / "p.png")
    r = pymoe.route(np.random.default_rng(0).normal(size=(8, 4)), 2)
    with pytest.raises(TypeError, match="routing: expected a pymoe.Routing"):
        viz.routing_heatmap({"gate": r.gate}, png)
    with pytest.raises(TypeError, match="routing: expected a pymoe.Routing"):
        viz.dispatch_combine_picture(r.__dict__, png)
    with pytest.raises(TypeError, match=r"routings\['a'\]: expected a pymoe.Routing"):
        viz.expert_load_bars({"a": 3}, png)
    with pytest.raises(ValueError, match="routings: expected at least one entry"):
        viz.expert_load_bars({}, png)
    with pytest.raises(ValueError, match="series: expected at least one entry"):
        viz.curves(None, {}, png, title="t", xlabel="x", ylabel="y")
    with pytest.raises(ValueError, match=r"series\['a'\]: expected a 1-D sequence"):
        viz.curves(None, {"a": np.ones((2, 2))}, png, title="t", xlabel="x", ylabel="y")
    with pytest.raises(ValueError, match="series: every series is empty"):
        viz.curves(None, {"a": []}, png, title="t", xlabel="x", ylabel="y")
    with pytest.raises(ValueError, match=r"counts: expected a non-empty 2-D array, got shape \(4,\)"):
        viz.class_expert_heatmap(np.ones(4), png)
    with pytest.raises(ValueError, match=r"matrices\['exact'\]: expected a non-empty 2-D"):
        viz.send_matrices({"exact": np.zeros((0, 0))}, png, title="t")
    with pytest.raises(ValueError, match="matrices: expected at least one entry"):
        viz.send_matrices({}, png, title="t")
    with pytest.raises(TypeError, match="comparison: expected the result of pymoe.compare"):
        viz.preset_differences({"names": ["a"]}, png)


def test_viz_refuses_a_path_under_a_file(tmp_path):
    if not viz.have_matplotlib():
        pytest.skip("matplotlib is not installed")
    f = tmp_path / "f"
    f.write_text("x")
    r = pymoe.route(np.random.default_rng(0).normal(size=(8, 4)), 2)
    with pytest.raises(ValueError, match="path: cannot write .* is a file, not a folder"):
        viz.routing_heatmap(r, str(f / "p.png"))


# ------------------------------------------------ the CLI fuzz: random flags, as subprocesses
CLI_FLAGS = {
    "pymoe.compare": [("--tokens", ["-5", "0", "3", "x"]), ("--experts", ["0", "4", "-1"]),
                      ("--k", ["0", "9", "2"]), ("--capacity-factor", ["-1", "none", "nan", "1.5"]),
                      ("--presets", ["mixtral", "gpt5", ",", "switch,switch"]),
                      ("--score", ["sigmoid", "cosine"]), ("--min-capacity", ["-2", "1"])],
    "pymoe.bench": [("--T", ["0", "-4", "x"]), ("--D", ["0"]), ("--E", ["0", "2"]),
                    ("--K", ["9", "0"]), ("--capacity-factor", ["-1", "0", "inf"]),
                    ("--repeats", ["0", "-3"]), ("--block-size", ["0"])],
}
CLI_FUZZ_CASES = int(os.environ.get("PYMOE_CLI_FUZZ_CASES", "8"))


def cli_fuzz_cases(n: int, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        prog = str(rng.choice(sorted(CLI_FLAGS)))
        flags = CLI_FLAGS[prog]
        argv = [prog] + (["--quick", "--no-torch", "--no-sweep", "--no-layer", "--no-dense",
                          "--no-routing"] if prog == "pymoe.bench" else ["--tokens", "8"])
        for i in rng.choice(len(flags), size=int(rng.integers(1, 3)), replace=False):
            name, values = flags[int(i)]
            argv += [name, str(rng.choice(values))]
        cases.append(argv)
    return cases


def test_cli_fuzz_bad_flags_end_in_one_line_errors():
    """Random flag values for both CLIs: each run succeeds or ends in argparse's one-line error
    (exit status 2), never a traceback."""
    outcomes = {"ok": 0, "error": 0}
    for argv in cli_fuzz_cases(CLI_FUZZ_CASES, seed=27):
        proc = run(*argv, timeout=300)
        assert "Traceback" not in proc.stderr, (argv, proc.stderr[-2000:])
        assert proc.returncode in (0, 2), (argv, proc.returncode, proc.stderr[-2000:])
        outcomes["ok" if proc.returncode == 0 else "error"] += 1
    print(f"CLI fuzz: {CLI_FUZZ_CASES} runs, {outcomes['ok']} ran, {outcomes['error']} refused")
