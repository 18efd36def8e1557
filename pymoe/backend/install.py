"""How this copy of pymoe was installed, and what to say when its C core is missing.

The trap this module names: after a non-editable `pip install .`, running Python from the repository
root imports the checkout (the current directory comes first on sys.path), not the installed copy,
and the checkout has no compiled C core. Everything still runs on NumPy, silently slower; so pymoe
says so once, at import, and pymoe.backends() gives the same reason.

Nothing here imports the C core: loading it starts OpenMP, which pymoe.c_backend does on first use
(after setting OMP_WAIT_POLICY), not at `import pymoe`.
"""
from __future__ import annotations

import importlib.machinery
import os
import sys
import warnings

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # pymoe/
STATUS_FILE = os.path.join(PACKAGE_DIR, "_c_build_status.txt")  # setup.py writes it on failure
DISTRIBUTION = "pymoe-routing"  # the name on the package index; the import name is pymoe


class CCoreMissingWarning(RuntimeWarning):
    """pymoe was imported without its C core: every operation runs on NumPy."""


def source_root() -> str | None:
    """The checkout this package was imported from, or None for an installed copy."""
    root = os.path.dirname(PACKAGE_DIR)
    if all(os.path.exists(os.path.join(root, name)) for name in ("setup.py", "csrc")):
        return root
    return None


def core_built() -> bool:
    """Whether the compiled C core sits in this package's folder (found, not loaded)."""
    return importlib.machinery.PathFinder.find_spec("pymoe._pymoe_c", [PACKAGE_DIR]) is not None


def installed_copy(root: str) -> str | None:
    """Another pymoe on sys.path than the one in checkout `root` (e.g. in site-packages)."""
    here = os.path.realpath(root)
    paths = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("pymoe", paths)
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.realpath(next(iter(spec.submodule_search_locations)))


def why_core_missing(import_error: str, status_file: str = STATUS_FILE) -> str:
    """One line: why pymoe._pymoe_c cannot be imported, and what to run about it."""
    if os.path.exists(status_file):
        with open(status_file, encoding="utf-8") as f:
            return " ".join(f.read().split())
    root = source_root()
    if root is not None and not core_built():
        other = installed_copy(root)
        where = (f"; the installed copy at {other} is not the one imported: run from another "
                 "directory to use it, or" if other else ";")
        return (f"pymoe was imported from the source tree {root} (Python puts the current "
                f"directory first on sys.path), where the C core has not been built{where} build "
                "it in this checkout with `pip install -e .`")
    return (f"the C extension pymoe._pymoe_c is not importable ({import_error}); reinstall with "
            f"`pip install -v {DISTRIBUTION}` (or `pip install -v .` in a checkout) to see the "
            "compiler's output")


def warn_if_core_missing() -> None:
    """At import: one warning line when the C core is not built, unless PYMOE_DISABLE_C=1 says
    that NumPy alone is intended (it also silences this; so does a CCoreMissingWarning filter)."""
    if os.environ.get("PYMOE_DISABLE_C") == "1" or core_built():
        return
    reason = why_core_missing("no compiled module pymoe._pymoe_c in " + PACKAGE_DIR)
    # warn_explicit at line 0 of the package: a single line, with no source line echoed under it.
    warnings.warn_explicit(f"pymoe's C core is missing, NumPy runs everything: {reason}. "
                           "PYMOE_DISABLE_C=1 silences this.", CCoreMissingWarning,
                           os.path.join(PACKAGE_DIR, "__init__.py"), 0, module="pymoe")
