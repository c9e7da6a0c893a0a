# Everything a developer or CI needs starts here; nothing is installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: all venv test check lint typecheck pytest demo bench lock clean

all: test

# Every package, the build backend included, comes from requirements.lock, pinned with hashes.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check daemon cloud tests bench
	$(BIN)/ruff format --check daemon cloud tests bench

typecheck: $(STAMP)
	$(BIN)/mypy daemon/gastown_sandboxd cloud/gastown_cloud tests bench

pytest: $(STAMP)
	$(BIN)/pytest

test: lint typecheck pytest

# The fast lane (under a minute): everything but the suites marked slow in tests/conftest.py.
check: lint typecheck
	$(BIN)/pytest -m "not slow"

demo: $(STAMP)
	$(BIN)/python -m gastown_cloud.demo

bench: $(STAMP)
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
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
