# The two commands of the README. Both run the idempotent set-up first.
.PHONY: setup demo test lint clean vm-test image

VENV := .venv
PY := $(VENV)/bin/python

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/nodecryptor-demo

test: setup
	bash scripts/test.sh

# The static checks alone (scripts/lint.sh; `make test` runs them first).
lint: setup
	bash scripts/lint.sh

# nodecryptor against kernel WireGuard in a Debian 6.1 qemu guest (vm-tests/README.md).
vm-test: setup
	bash scripts/setup-vm.sh
	$(PY) -m pytest -q tests/vm

# The agent image from Debian packages and locked wheels, built on this machine (no registry):
# localhost/nodecryptor:dev in podman's storage and dist/nodecryptor-image.tar (OCI archive).
# Does nothing when both are up to date; see scripts/build-image.sh.
image: setup
	bash scripts/setup-image.sh
	bash scripts/build-image.sh

# Benchmark suite (docs/performance.md): tables on stdout, JSON in benchmarks/results/.
# bench: every size, longer runs; bench-quick: 0 and 10,000 nodes, a few minutes.
# The packet sender (benchmarks/sender.c) is compiled at run time: gcc and libc headers.
.PHONY: bench bench-quick bench-deps
bench: setup bench-deps
	$(PY) benchmarks/suite.py --mode full

bench-quick: setup bench-deps
	$(PY) benchmarks/suite.py --mode quick

bench-deps:
	@dpkg -s gcc libc6-dev >/dev/null 2>&1 || { apt-get update -qq && \
	  apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null; }

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache dist
