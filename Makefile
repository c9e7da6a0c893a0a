# Everything a developer or CI needs starts here; nothing is installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: all venv test lint typecheck pytest demo bench clean tools

# The real peers of the agent tests: tmux (Debian) and Claude Code (npm, pinned, project-local).
CLAUDE_CODE_VERSION := 2.1.328
NPM_PREFIX := .cache/npm
CLAUDE_STAMP := $(NPM_PREFIX)/.claude-code-$(CLAUDE_CODE_VERSION)

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

tools: $(CLAUDE_STAMP)
	@command -v tmux >/dev/null || { apt-get update -qq && apt-get install -y --no-install-recommends tmux; }

$(CLAUDE_STAMP):
	mkdir -p $(NPM_PREFIX)
	npm install --silent --no-audit --no-fund --prefix $(NPM_PREFIX) @anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION)
	touch $@

lint: $(STAMP)
	$(BIN)/ruff check daemon cloud tests bench
	$(BIN)/ruff format --check daemon cloud tests bench

typecheck: $(STAMP)
	$(BIN)/mypy daemon/gastown_sandboxd cloud/gastown_cloud tests bench

pytest: $(STAMP) tools
	$(BIN)/pytest

test: lint typecheck pytest

demo: $(STAMP)
	$(BIN)/python -m gastown_cloud.demo

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis .cache
