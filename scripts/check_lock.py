"""Fail when pyproject.toml and requirements/lock.txt disagree.

Every requirement in `[project.dependencies]` and the `test` extra must be pinned in the lock at a
version its specifier admits, and every pin in requirements/nodeps.in must be in nodeps.txt.
Offline and fast: it reads files only.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", re.MULTILINE)


def pins(path: Path) -> dict[str, Version]:
    """name → pinned version of a pip-compile/uv requirements file."""
    return {canonicalize_name(n): Version(v) for n, v in PIN.findall(path.read_text())}


def problems(root: Path = ROOT) -> list[str]:
    """Every disagreement between pyproject.toml and the lock files under `root`."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    locked = pins(root / "requirements" / "lock.txt")
    out = []
    for line in wanted:
        req = Requirement(line)
        version = locked.get(canonicalize_name(req.name))
        if version is None:
            out.append(f"{req.name}: in pyproject.toml, missing from requirements/lock.txt")
        elif not req.specifier.contains(version, prereleases=True):
            out.append(f"{req.name}: lock pins {version}, pyproject.toml wants {req.specifier}")
    nodeps = pins(root / "requirements" / "nodeps.txt")
    for name, version in pins(root / "requirements" / "nodeps.in").items():
        if nodeps.get(name) != version:
            out.append(f"{name}: nodeps.in wants {version}, nodeps.txt has {nodeps.get(name)}")
    return out


def main() -> int:
    found = problems()
    for p in found:
        print(f"lock mismatch: {p}", file=sys.stderr)
    if found:
        print("re-lock with: bash scripts/lock.sh", file=sys.stderr)
        return 1
    print("lock matches pyproject.toml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
