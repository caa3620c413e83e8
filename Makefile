# Every target creates or reuses .venv itself, so on a fresh clone `make demo` and `make test`
# are the whole set-up. Label Studio pins packages that clash with ours, so it gets .ls-venv.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
LS_VENV := .ls-venv
LS_VERSION ?= 1.23.0
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and by exact version: pip takes the CPU build from local disk.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,dask]'
	touch $(STAMP)

$(LS_VENV)/.installed:
	test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install -q --upgrade pip
	# sentry-sdk 3 (2026-12-07) drops an option Label Studio 1.23 passes at start-up.
	$(LS_VENV)/bin/pip install -q 'label-studio==$(LS_VERSION)' 'sentry-sdk<3'
	touch $(LS_VENV)/.installed

demo: $(STAMP)
	$(BIN)/data-engine demo --root ./engine-data

test: $(STAMP) $(LS_VENV)/.installed
	LABEL_STUDIO_BIN=$(abspath $(LS_VENV))/bin/label-studio $(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m benchmarks.run_all --out bench-results

lint: $(STAMP)
	$(BIN)/ruff check engine flows annotation_ui storage tests benchmarks
	$(BIN)/ruff format --check engine flows annotation_ui storage tests benchmarks
	$(BIN)/mypy engine storage flows annotation_ui

clean:
	rm -rf $(VENV) $(LS_VENV) engine-data bench-results
