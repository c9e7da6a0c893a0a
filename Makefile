# Everything a developer or CI needs starts here; nothing is installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: all venv test lint typecheck pytest demo bench clean

# Node's jsonwebtoken (npm, pinned, project-local) checks the cloud's kilo-claims tokens.
JSONWEBTOKEN_VERSION := 9.0.3
NPM_PREFIX := .cache/npm
JSONWEBTOKEN_STAMP := $(NPM_PREFIX)/.jsonwebtoken-$(JSONWEBTOKEN_VERSION)

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

$(JSONWEBTOKEN_STAMP):
	@command -v npm >/dev/null || { apt-get update -qq && apt-get install -y --no-install-recommends nodejs npm; }
	mkdir -p $(NPM_PREFIX)
	npm install --silent --no-audit --no-fund --prefix $(NPM_PREFIX) jsonwebtoken@$(JSONWEBTOKEN_VERSION)
	touch $@

pytest: $(JSONWEBTOKEN_STAMP)

pytest: $(STAMP)
	$(BIN)/pytest

test: lint typecheck pytest

demo: $(STAMP)
	$(BIN)/python -m gastown_cloud.demo

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
