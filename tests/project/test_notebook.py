"""The notebook version of the walkthrough is generated from the scripts, runs, and is current."""
import importlib.util
import json
import os

from helpers import REPO

COMMITTED = os.path.join(REPO, "docs", "walkthrough.ipynb")


def _make_notebook():
    spec = importlib.util.spec_from_file_location(
        "make_notebook", os.path.join(REPO, "examples", "make_notebook.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cells(nb: dict) -> list[tuple[str, str]]:
    return [(c["cell_type"], "".join(c["source"])) for c in nb["cells"]]


def test_notebook_executes_and_the_committed_copy_is_current(tmp_path):
    out = tmp_path / "walkthrough.ipynb"
    _make_notebook().build(str(out))
    fresh = json.loads(out.read_text(encoding="utf-8"))
    code = [c for c in fresh["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] for c in code[1:])  # every cell but the imports prints
    assert not any(o["output_type"] == "error" for c in code for o in c["outputs"])
    text = "".join("".join(o.get("text", "")) for c in code for o in c["outputs"])
    for step in ("1. router_logits", "12. load-balancing loss", "per-token loop", "B9. dx",
                 "Finite-difference check"):
        assert step in text
    with open(COMMITTED, encoding="utf-8") as f:
        committed = json.load(f)
    assert _cells(committed) == _cells(fresh), (
        "docs/walkthrough.ipynb is stale: run python examples/make_notebook.py")
    # It opens with every output in place, pictures included.
    kept = [c for c in committed["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] for c in kept[1:])
    assert any("image/png" in o.get("data", {}) for c in kept for o in c["outputs"])
