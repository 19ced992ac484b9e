# make demo: set up .venv, then train 6 epochs on a generated synthetic set and test it (the whole pipeline, no real data).
# make test: set up .venv, then run the tests (the DALI CPU tests included).
# make test-fast: the inner loop, without the slow tests and those that need ../shared/data.
# make informe: render informe.md to informe.pdf (markdown-pdf, installed by make setup).
# make bench: every benchmark table on stdout (about 7 min on 2 cores); SECTIONS="transforms loaders" picks.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := out/demo

.PHONY: setup demo test test-fast bench informe clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dali,dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python train.py --demo --no-pretrained --epochs 6 --tta 4 --out $(DEMO) --weights-out $(DEMO)/modelo.h5

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not data"

bench: setup
	$(BIN)/python -m benchmarks $(if $(SECTIONS),--sections $(SECTIONS))

informe: setup
	$(BIN)/python report.py informe.md informe.pdf

clean:
	rm -rf out .pytest_cache
