#!/usr/bin/env bash
# Static checks, run first by `make test` (scripts/test.sh) and alone by `make lint`: the layering
# contracts, ruff's lint, ruff's format check, mypy (each configured in pyproject.toml). Needs the
# venv scripts/setup.sh creates.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/lint-imports
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
