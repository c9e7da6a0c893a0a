# Everything a developer or CI needs starts here; nothing is installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: all venv tools npm bytecode test check lint typecheck pytest demo bench lock clean

all: test

# Every package, the build backend included, comes from requirements.lock, pinned with hashes.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

# What the tests run besides Python and make, as command:Debian-package.
TOOLS := curl:curl bash:bash systemd-analyze:systemd shellcheck:shellcheck tmux:tmux \
	node:nodejs npm:npm go:golang-go openssl:openssl valgrind:valgrind

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

# The npm peers, pinned and project-local: Claude Code and Codex (the agent tests run the real
# CLIs) and jsonwebtoken (it checks the cloud's kilo-claims tokens).
CLAUDE_CODE_VERSION  := 2.1.337
CODEX_VERSION        := 0.171.0
JSONWEBTOKEN_VERSION := 9.0.3
NPM_PREFIX := .cache/npm
NPM_STAMP  := $(NPM_PREFIX)/.installed-$(CLAUDE_CODE_VERSION)-$(CODEX_VERSION)-$(JSONWEBTOKEN_VERSION)

$(NPM_STAMP): | tools
	mkdir -p $(NPM_PREFIX)
	npm install --silent --no-audit --no-fund --prefix $(NPM_PREFIX) \
		@anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION) @openai/codex@$(CODEX_VERSION) \
		jsonwebtoken@$(JSONWEBTOKEN_VERSION)
	touch $@

npm: $(NPM_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check daemon cloud tests bench
	$(BIN)/ruff format --check daemon cloud tests bench

typecheck: $(STAMP)
	$(BIN)/mypy daemon/gastown_sandboxd cloud/gastown_cloud tests bench

# Four workers on two cores: many suites wait on real time (daemons starting, tokens ageing);
# with the long tests first (tests/conftest.py), 4 measured 3:28 against 4:04 for 3, back to back.
PYTEST_WORKERS ?= 4

# Bytecode for the project's own modules, written here because Python does not write it where
# PYTHONDONTWRITEBYTECODE is set (pip compiles what it installs, but the project is editable):
# without it every daemon and command a test starts compiled the modules it imports, ~75 ms of
# CPU per daemon start. compileall skips what is up to date.
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q daemon cloud tests bench >/dev/null

pytest: $(STAMP) tools npm bytecode
	$(BIN)/pytest -n $(PYTEST_WORKERS) --maxschedchunk 1 --durations 12

test: lint typecheck pytest

# The fast lane (under a minute): everything but the suites marked slow in tests/conftest.py.
check: lint typecheck npm bytecode
	$(BIN)/pytest -n 2 -m "not slow"

demo: $(STAMP) bytecode
	$(BIN)/python -m gastown_cloud.demo

# wrk drives the HTTP rows of the benchmarks; valgrind counts the instructions per PATCH.
bench: $(STAMP) bytecode
	@for tool in wrk valgrind; do \
	  command -v $$tool >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get -o DPkg::Lock::Timeout=300 update -qq \
	    && apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends $$tool >/dev/null; } \
	    || echo "make bench: $$tool is missing (apt-get install $$tool); its rows are skipped" >&2; \
	done
	$(BIN)/python -m bench

# Re-pin after a change to pyproject.toml with `make lock` (pins already in the file are kept;
# `make lock UPGRADE=--upgrade` takes the newest releases), then `make test`, and commit
# requirements.lock with the change.
UPGRADE ?=
lock: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv
	printf "hatchling\neditables\n" | $(BIN)/uv pip compile pyproject.toml - --extra test --generate-hashes \
		--universal --python-version 3.11 $(UPGRADE) --quiet -o requirements.lock

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis .cache
