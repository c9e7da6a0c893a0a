# Everything a developer or CI needs starts here; nothing is installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: all venv test lint typecheck pytest demo bench clean

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

test: lint typecheck pytest

demo: $(STAMP)
	$(BIN)/python -m gastown_cloud.demo

bench: $(STAMP)
	command -v wrk >/dev/null || apt-get install -y --no-install-recommends wrk
	# Byte-compiled as an installed package is (PYTHONDONTWRITEBYTECODE would skew RSS).
	$(BIN)/python -m compileall -q daemon cloud >/dev/null
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
