"""Copy the `fedllm` package as it installs: `services/` and `schemas/` inside `fedllm/`.

The folders stay where the user put them and install as `fedllm.services` and `fedllm.schemas`
(pyproject's package-dir). Tools that walk the file system (import-linter, the mutation check)
run against this copy with PYTHONPATH pointing at it:

    python scripts/installed_layout.py lint   # import-linter contracts (.importlinter)
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


if __name__ == "__main__":
    if sys.argv[1:] != ["lint"]:
        sys.exit(__doc__)
    sys.exit(lint())
