# The two commands of the README. Both run the idempotent set-up first.
.PHONY: setup demo test test-unit test-privileged lint clean

VENV := .venv
PY := $(VENV)/bin/python

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/nodecryptor demo

test: setup
	bash scripts/test.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
