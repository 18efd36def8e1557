"""README stays true: its code runs, its two commands are where .ci/run reads them."""
import os
import re

import numpy as np

from helpers import REPO

README = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()


def test_using_it_snippet_runs(tmp_path, monkeypatch):
    section = README.split("## Using it", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    rng = np.random.default_rng(0)
    env = {"router_logits": rng.normal(size=(64, 8)), "dgate": rng.normal(size=(64, 2)),
           "x": rng.normal(size=(4, 16, 512)).astype(np.float32)}
    env["dy"] = np.ones_like(env["x"])
    monkeypatch.chdir(tmp_path)  # the viz calls write their pictures here
    exec(compile(code, "README.md", "exec"), env)  # the README's own example
    assert env["y"].shape == env["x"].shape and env["dx"].shape == env["x"].shape
    assert env["dlogits"].shape == (64, 8)


def test_two_commands_on_the_first_screen():
    first_screen = "\n".join(README.splitlines()[:30])
    for marker in ("<!-- main-command -->", "<!-- test-command -->"):
        assert marker in first_screen
        line = README.split(marker, 1)[1].split("```bash\n", 1)[1].split("\n", 1)[0]
        assert line.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install")
    ci = open(os.path.join(REPO, ".ci", "run"), encoding="utf-8").read()
    assert "readme_command main-command" in ci and "readme_command test-command" in ci
