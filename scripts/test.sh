#!/usr/bin/env bash
# Every test suite. Privileged and BPF tests run here too: on CI (CI=true) a missing kernel
# feature fails them instead of skipping (see tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
# Static checks first (layering contracts, ruff lint and format check, mypy): a broken contract,
# a lint finding or a type error fails here, before any test runs.
bash scripts/lint.sh
bash scripts/setup-vm.sh
bash scripts/setup-image.sh
.venv/bin/python -m pytest -q tests "$@"
