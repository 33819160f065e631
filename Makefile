# flowerml: `make demo` and `make test` create .venv on first use and install into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-fast lint demo deploy-demo fresh-demo bench clean

# '.[dev]': the test tools and every extra (dask), so make test, demo and bench have all they use.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports  # the layering contracts in pyproject.toml [tool.importlinter]

# Three workers on two cores: the deployment tests spend most of their time waiting (missed
# heartbeats, a worker's poll), so a third worker fills those waits. --dist loadfile keeps a
# module (and its server) on one worker; --no-loadscope-reorder keeps the order tests/conftest.py
# gives the modules, longest first (xdist's own, most tests first, started the longest last).
test: $(STAMP) lint
	$(BIN)/pytest -q -n 3 --dist loadfile --no-loadscope-reorder

test-fast: $(STAMP)
	$(BIN)/pytest -q -n 3 --dist loadfile -m "not slow"

demo: $(STAMP)
	$(BIN)/flowerml retrain --preset demo || [ $$? -eq 1 ]  # 1: ran, the gate said no
	@echo "(flowerml is installed in $(VENV): run '. $(VENV)/bin/activate' before the command above)"

deploy-demo: $(STAMP)
	$(BIN)/python deploy/demo.py

# Keeping the model fresh: v1 promoted, labelled images added, their event retrains v2, the
# weekly run ends Up to date (a local Prefect server, two workers; ~3 min on 2 quiet cores).
fresh-demo: $(STAMP)
	$(BIN)/python deploy/fresh_demo.py

bench: $(STAMP)
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) flowerml-store flowerml-cache flowerml-deploy-demo flowerml-fresh-demo .pytest_cache .ruff_cache
