# make demo: set up .venv, then run the main job on the embedded default (a synthetic data set).
# make test: set up .venv, then run the tests (the DALI CPU tests included).
# make bench: every benchmark table on stdout (about 7 min on 2 cores); SECTIONS="transforms loaders" picks.
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
	$(BIN)/python -m benchmarks $(if $(SECTIONS),--sections $(SECTIONS))

clean:
	rm -rf out .pytest_cache
