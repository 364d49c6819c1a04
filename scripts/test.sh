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
# The 6.1 verifier before anything slow: the program loads on this machine's newer kernel in
# the tests below, but a construct only 6.18 accepts would otherwise surface only in the
# 20-minute VM suite (tests/vm, last below). One guest boot, compile and load, ~1-2 min. This
# is the only load-only run: tests/vm runs the whole scenario, which loads the program itself.
bash scripts/vm-load-check.sh
.venv/bin/python -m pytest -q tests "$@"
