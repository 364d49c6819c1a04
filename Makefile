# The two commands of the README. Both run the idempotent set-up first.
.PHONY: setup demo test test-unit test-privileged lint clean vm-test

VENV := .venv
PY := $(VENV)/bin/python

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/nodecryptor-demo

test: setup
	bash scripts/test.sh

# nodecryptor against kernel WireGuard in a Debian 6.1 qemu guest (vm-tests/README.md).
vm-test: setup
	bash scripts/setup-vm.sh
	$(PY) -m pytest -q tests/vm

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
