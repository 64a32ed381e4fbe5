#!/usr/bin/env bash
# Re-lock every dependency for CPython 3.11 on Linux x86_64 (the CPU torch wheel from /opt/wheels).
# Pins already in the lock are kept; pass `-P NAME` to upgrade one package, `-U` to upgrade all:
#   bash scripts/lock.sh -P transformers
# Needs uv (`python -m pip install uv`).
set -euo pipefail
cd "$(dirname "$0")/.."
common=(--generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28)
uv pip compile pyproject.toml --extra test "${common[@]}" \
  --find-links /opt/wheels --index-strategy unsafe-best-match -o requirements/lock.txt "$@"
uv pip compile requirements/nodeps.in --no-deps "${common[@]}" -o requirements/nodeps.txt "$@"
python scripts/check_lock.py
