# Entry points that each set themselves up on a fresh machine:
#   make repro             the whole DVC pipeline on the default corpus
#   make repro-arithmetic  the arithmetic recipe (recipes/arithmetic/, a DVC project of its own)
#   make test              the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: repro repro-arithmetic test lint venv clean-venv

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[pipeline,test]'
	touch $@

venv: $(BIN)/.installed

repro: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

repro-arithmetic: venv
	cd recipes/arithmetic && PATH="$(abspath $(BIN)):$$PATH" $(abspath $(BIN))/dvc repro

test: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -n 2 -q

lint: venv
	$(BIN)/ruff check chargen pipeline stages tests benchmarks

clean-venv:
	rm -rf $(VENV)
