"""Every number README quotes comes from a command README names, and still comes out of it.

README wraps each quoted passage in  <!-- output: NAME --> ... <!-- /output -->,  where NAME is an
example script (examples/NAME.py). `python examples/run_all.py --out docs/img --transcripts
docs/outputs` writes what each example prints to docs/outputs/NAME.txt. The tests check that every
number in a passage appears in that transcript, and rerun the examples whose output is
deterministic and quick to compare their output with the committed transcript line for line.

Line for line means: the words and integers exactly, and each printed decimal to one unit in its
last printed digit. Which BLAS kernel OpenBLAS picks depends on the CPU (SkylakeX, Haswell, ...),
and so do the last bits of a matmul: a value that lies near a rounding boundary can print one digit
up on another machine. A figure that is round-off by nature (a finite-difference error, the gap
between two sums) is printed as a bound (`< 1e-6`) by the example itself.
"""
import contextlib
import importlib.util
import io
import os
import re

import pytest

from helpers import REPO

README = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
OUTPUTS = os.path.join(REPO, "docs", "outputs")
PASSAGE = re.compile(r"<!-- output: ([\w]+) -->(.*?)<!-- /output -->", re.S)
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?")
# A printed number: sign, digits, an optional fraction and an optional exponent.
PRINTED = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
# Cheap and deterministic (no timings, no training): rerun them and compare with the transcript.
RERUN = {"00_why": [], "01b_backward": [], "02_capacity": [], "05_conventions": []}


def transcript(name: str) -> str:
    with open(os.path.join(OUTPUTS, name + ".txt"), encoding="utf-8") as f:
        return f.read()


def passages() -> list[tuple[str, str]]:
    return PASSAGE.findall(README)


def test_readme_marks_its_quoted_output():
    names = {name for name, _ in passages()}
    assert {"00_why", "02_capacity", "03_train"} <= names


@pytest.mark.parametrize("name, text", passages(), ids=[n for n, _ in passages()])
def test_every_quoted_number_is_in_the_named_output(name, text):
    out = transcript(name)
    assert out.startswith(f"$ python examples/{name}.py"), "a transcript names its command"
    missing = [n for n in NUMBER.findall(text) if n not in out]
    assert not missing, f"README quotes {missing} from {name}, which does not print them"


@pytest.mark.parametrize("name", sorted(RERUN))
def test_transcripts_are_current(name, tmp_path):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "examples",
                                                                     name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        mod.main(RERUN[name] + ["--out", str(tmp_path)])
    committed = transcript(name).split("\n", 1)[1]
    differences = transcript_differences(committed, buf.getvalue())
    assert not differences, (
        f"examples/{name}.py no longer prints what docs/outputs/{name}.txt holds (beyond one unit "
        "in a printed decimal's last digit):\n" + "\n".join(differences[:10])
        + "\nIf the change is intended: python examples/run_all.py --out docs/img "
        "--transcripts docs/outputs")


def _unit(token: str) -> float:
    """One unit in the last printed digit of a decimal token ('0.125' -> 0.001, '2.6e-08' ->
    1e-9); 0.0 for an integer, which must match exactly."""
    mantissa, _, exponent = token.lower().partition("e")
    if "." not in mantissa:
        return 0.0 if not exponent else 10.0 ** int(exponent)
    return 10.0 ** (int(exponent or 0) - len(mantissa.split(".")[1]))


def transcript_differences(committed: str, now: str) -> list[str]:
    """The lines of `now` that differ from `committed` in their words, in an integer, or in a
    decimal by more than one unit in its last printed digit (see the module docstring)."""
    old, new = committed.splitlines(), now.splitlines()
    if len(old) != len(new):
        return [f"{len(new)} lines printed, {len(old)} in the transcript"]
    out = []
    for i, (a, b) in enumerate(zip(old, new), 1):
        # white space folded: a sign that flips on a printed zero ('-0.' / '0.') moves columns
        words_a, words_b = ([" ".join(w.split()) for w in PRINTED.split(line)] for line in (a, b))
        nums_a, nums_b = PRINTED.findall(a), PRINTED.findall(b)
        same = words_a == words_b and len(nums_a) == len(nums_b) and all(
            x == y or abs(float(x) - float(y)) <= max(_unit(x), _unit(y)) * (1 + 1e-9)
            for x, y in zip(nums_a, nums_b))
        if not same:
            out.append(f"  line {i}: transcript {a!r}\n  {' ' * len(str(i))}       now {b!r}")
    return out


def test_transcript_comparison_allows_one_unit_in_the_last_digit_only():
    assert not transcript_differences("p 0.125 of 16, 2.6e-08", "p 0.126 of 16, 2.7e-08")
    assert transcript_differences("p 0.125", "p 0.127")  # two units: a real change
    assert transcript_differences("kept 9 of 16", "kept 10 of 16")  # integers exactly
    assert transcript_differences("aux 1.4565", "aux loss 1.4565")  # the words exactly
    assert not transcript_differences("t4 -0.131 -0.    -0.004", "t4 -0.131  0.    -0.004")
    assert transcript_differences("a\nb", "a")
