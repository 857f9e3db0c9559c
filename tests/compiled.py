"""Whether a module under test is the mypyc-compiled build (``make compiled``, issue 14): the
suite runs on the pure-Python sources, and again on the compiled copy (``make unit-compiled``).

A compiled class checks its arguments' types and has no per-instance attributes to patch, so a
test that hands it a duck-typed fake, or monkeypatches one of its methods on an instance, runs
on the pure-Python build only (``pure_python_only``)."""

from __future__ import annotations

from types import ModuleType

import pytest


def compiled(module: ModuleType) -> bool:
    return not str(module.__file__).endswith(".py")


def pure_python_only(module: ModuleType) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        compiled(module), reason=f"{module.__name__} is compiled: fakes and patches need Python"
    )
