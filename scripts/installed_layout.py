"""Copy the `fedllm` package as it installs: `services/` and `schemas/` inside `fedllm/`.

The folders stay where the user put them and install as `fedllm.services` and `fedllm.schemas`
(pyproject's package-dir). Tools that walk the file system (import-linter, mypy, the mutation
check) run against this copy with PYTHONPATH pointing at it:

    python scripts/installed_layout.py lint   # import-linter contracts (.importlinter)
    python scripts/installed_layout.py mypy   # mypy -p fedllm ([tool.mypy] in pyproject.toml)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYOUT = (("fedllm", "fedllm"), ("services", "fedllm/services"), ("schemas", "fedllm/schemas"))
# mypy's cache keys on file paths: a fixed copy (mtimes kept) lets repeated runs reuse it.
MYPY_LAYOUT = REPO / "build" / "mypy-layout"


def source_path(installed: str) -> Path:
    """Where a file of the installed layout (e.g. `fedllm/services/x.py`) lives in the repo."""
    for src, rel in sorted(LAYOUT, key=lambda pair: -len(pair[1])):
        if installed == rel or installed.startswith(rel + "/"):
            return REPO / src / installed[len(rel) :].lstrip("/")
    return REPO / installed


def copy_installed_layout(dst: Path, *, with_tests: bool = False) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for src, rel in LAYOUT + ((("tests", "tests"),) if with_tests else ()):
        shutil.copytree(REPO / src, dst / rel, ignore=ignore)
    shutil.copy2(REPO / "pyproject.toml", dst / "pyproject.toml")


def lint() -> int:
    with tempfile.TemporaryDirectory(prefix="fedllm-layout-") as tmp:
        copy_installed_layout(Path(tmp))
        shutil.copy2(REPO / ".importlinter", Path(tmp) / ".importlinter")
        env = {**os.environ, "PYTHONPATH": tmp}
        lint_imports = Path(os.path.abspath(sys.executable)).with_name("lint-imports")
        return subprocess.run([str(lint_imports), "--no-cache"], cwd=tmp, env=env).returncode


def mypy() -> int:
    shutil.rmtree(MYPY_LAYOUT / "fedllm", ignore_errors=True)
    MYPY_LAYOUT.mkdir(parents=True, exist_ok=True)
    copy_installed_layout(MYPY_LAYOUT)
    cmd = [
        os.path.abspath(sys.executable),
        "-m",
        "mypy",
        "--cache-dir",
        str(MYPY_LAYOUT / ".mypy_cache"),
    ]
    return subprocess.run([*cmd, "-p", "fedllm"], cwd=MYPY_LAYOUT).returncode


if __name__ == "__main__":
    commands = {"lint": lint, "mypy": mypy}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    sys.exit(commands[sys.argv[1]]())
