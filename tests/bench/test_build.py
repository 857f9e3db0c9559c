"""The benchmarks run tenebra's compiled copy (make compiled) only when it was built from the
sources as they are now: a stale copy would measure code that is no longer there."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.harness import build_line, compiled_tree, source_digest


def test_a_copy_built_from_other_sources_is_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "compiled"
    copy.mkdir()
    monkeypatch.setenv("BENCH_COMPILED", str(copy))
    assert compiled_tree() is None  # never built
    assert "pure Python" in build_line()
    (copy / ".compiled").write_text("0" * 64 + "\n")
    assert compiled_tree() is None  # built from other sources
    assert "built from other sources" in build_line()
    (copy / ".compiled").write_text(source_digest() + "\n")
    assert compiled_tree() == copy
    assert "mypyc-compiled (0 modules" in build_line()


def test_the_digest_follows_every_source_file_not_only_python(tmp_path: Path) -> None:
    for folder in ("gateway", "protocol"):
        (tmp_path / folder).mkdir()
    (tmp_path / "gateway" / "a.py").write_text("x = 1\n")
    (tmp_path / "protocol" / "m.toml").write_text("[m]\n")
    before = source_digest(tmp_path)
    (tmp_path / "protocol" / "m.toml").write_text("[n]\n")
    edited = source_digest(tmp_path)
    assert edited != before
    (tmp_path / "gateway" / "__pycache__").mkdir()
    (tmp_path / "gateway" / "__pycache__" / "a.pyc").write_bytes(b"\0")
    assert source_digest(tmp_path) == edited  # caches are not sources
