#!/usr/bin/env bash
# Static gates, run before the tests (README's test command) and by pre-commit: lint, format,
# layer contracts (import-linter) and types (mypy, [tool.mypy] in pyproject.toml). Each fails the
# run on its own.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m ruff check .
python -m ruff format --check .
python scripts/installed_layout.py lint
python scripts/installed_layout.py mypy
