# kms: `make run` starts a development daemon; `make test` runs the whole suite.
# Both work on a fresh machine: they create .venv and install what they need.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHELL := /bin/bash

.PHONY: run test lint bench deps test-deps docker-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Re-install when the project's metadata changes.
$(VENV)/.stamp-install: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,lint,bench]'
	touch $@

deps: $(VENV)/.stamp-install

# Debian packages the tests drive for real: socat; systemd (systemd-analyze,
# systemd-socket-activate); util-linux (setpriv, prlimit); passwd (useradd); e2fsprogs
# (chattr). Installed only when missing.
DEBIAN_TEST_PACKAGES := socat:socat systemd:systemd-socket-activate util-linux:setpriv \
	util-linux:prlimit passwd:useradd e2fsprogs:chattr

test-deps: deps
	@missing=""; for entry in $(DEBIAN_TEST_PACKAGES); do \
		command -v "$${entry#*:}" >/dev/null || missing="$$missing $${entry%%:*}"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

run: deps
	$(BIN)/kmsd serve --dev

# Three workers on two cores: much of the suite waits on daemons and timeouts, so a
# third keeps the cores busy (measured: 134 s against 177 s with two).
test: test-deps
	$(BIN)/python -m pytest -q -n 3 --dist loadfile

lint: deps
	$(BIN)/ruff check kms_server kms_client tests benchmarks
	$(BIN)/ruff format --check kms_server kms_client tests benchmarks
	$(BIN)/mypy

# Builds the image and runs it for real (needs a Docker engine; not part of `make test`).
docker-test:
	bash docker/test.sh

bench: deps
	$(BIN)/python benchmarks/bench_kmsd.py

clean:
	rm -rf $(VENV) .kms-dev kms.sock .pytest_cache .mypy_cache .ruff_cache
