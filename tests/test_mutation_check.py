"""The mutation check (scripts/mutation_check.py) in CI's slow lane: every named mutation of
the privacy mechanism must make a test fail (issue #11, item 7a)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mutation_check.py"


def _load():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("mutation_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_every_mutation_names_source_that_exists() -> None:
    mc = _load()
    from installed_layout import source_path  # scripts/ is on sys.path once the script loaded

    names = [m.name for m in mc.MUTATIONS]
    assert len(names) == len(set(names)) >= 7
    for m in mc.MUTATIONS:
        # paths name the installed layout (fedllm/services/...); the source is services/...
        assert source_path(m.path).read_text().count(m.old) == 1, m.name


@pytest.mark.slow
def test_every_mutation_is_caught() -> None:
    assert _load().main([]) == 0
