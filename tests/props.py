"""hypothesis for the property tests, imported once here: `from props import given, settings, st`.

hypothesis is in the test extra; without it, a module that imports this one is skipped, with the
reason (profiles: conftest.py)."""
import pytest

pytest.importorskip("hypothesis", reason="hypothesis is in the test extra")
from hypothesis import given, settings
from hypothesis import strategies as st

__all__ = ["given", "settings", "st"]
