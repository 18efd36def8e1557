"""Every number README quotes comes from a command README names, and still comes out of it.

README wraps each quoted passage in  <!-- output: NAME --> ... <!-- /output -->,  where NAME is an
example script (examples/NAME.py). `python examples/run_all.py --out docs/img --transcripts
docs/outputs` writes what each example prints to docs/outputs/NAME.txt. The tests check that every
number in a passage appears in that transcript, and rerun the examples whose output is
deterministic and quick to compare their output with the committed transcript line for line.
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
    assert buf.getvalue() == committed, (
        f"docs/outputs/{name}.txt is stale: python examples/run_all.py --out docs/img "
        "--transcripts docs/outputs")
