# The two commands: `make demo` and `make test`. Both create .venv and install rsseg (with its dev extra)
# on first use, so a fresh clone on a machine with only Python and pip needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
WORKDIR ?= demo-run

.PHONY: demo test test-slow lint bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rsseg demo --workdir $(WORKDIR)

# The fast tier (pyproject's addopts deselect the slow and gpu markers): under 5 minutes on 2 cores.
test: $(STAMP)
	$(BIN)/python -m pytest

# The slow tier: every pipeline end to end, DDP/torchrun, kill -9, separate scheduler, console scripts.
# Exit status 5 (no test selected) counts as success.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow || test $$? -eq 5

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(WORKDIR) .pytest_cache .ruff_cache
