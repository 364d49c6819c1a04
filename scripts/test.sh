#!/usr/bin/env bash
# Every test suite. Privileged and BPF tests run here too: on CI (CI=true) a missing kernel
# feature fails them instead of skipping (see tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
# Layering contracts (pyproject.toml, [tool.importlinter]) first: a broken contract fails here.
.venv/bin/lint-imports
bash scripts/setup-vm.sh
bash scripts/setup-image.sh
.venv/bin/python -m pytest -q tests "$@"
