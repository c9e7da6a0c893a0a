# Everything a developer or CI needs starts here; nothing is installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: all venv tools test lint typecheck pytest demo bench clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check daemon cloud tests bench
	$(BIN)/ruff format --check daemon cloud tests bench

typecheck: $(STAMP)
	$(BIN)/mypy daemon/gastown_sandboxd cloud/gastown_cloud tests bench

pytest: $(STAMP)
	$(BIN)/pytest

# What the tests run besides Python and make, as command:Debian-package.
TOOLS := curl:curl bash:bash systemd-analyze:systemd shellcheck:shellcheck tmux:tmux \
	node:nodejs npm:npm wrk:wrk

# Installs what is missing as root where apt-get exists; else one line naming it, and fails.
tools:
	@missing=""; for pair in $(TOOLS); do \
	  command -v "$${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "make tools: installing$$missing"; \
	  apt-get -o DPkg::Lock::Timeout=300 update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends $$missing >/dev/null \
	  || { echo "make tools: apt-get could not install$$missing" >&2; exit 1; }; \
	else \
	  echo "make tools: the tests need these Debian packages, missing here:$$missing (apt-get install$$missing)" >&2; \
	  exit 1; \
	fi

test: tools lint typecheck pytest

demo: $(STAMP)
	$(BIN)/python -m gastown_cloud.demo

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
