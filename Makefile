# make demo: set up .venv, then run the main job on the embedded default (a synthetic data set).
# make test: set up .venv, then run the tests (the DALI CPU tests included).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := out/demo

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dali,dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python train.py --demo --no-pretrained --epochs 2 --tta 4 --out $(DEMO) --weights-out $(DEMO)/modelo.h5

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m pipelines.bench

clean:
	rm -rf out .pytest_cache
