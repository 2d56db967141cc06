# One place that installs everything mmguard needs and runs its jobs.
#   make demo   install, then run the main job on the bundled real emoji data
#   make test   install, then lint and run the test suite (what CI runs)
#   make bench  install, then run the (resumable, ~2 h) contrastive benchmark
#   make bench-lvlm  install, then run the (resumable, several hours) LVLM benchmark
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: install demo test lint bench bench-lvlm clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml scripts/install-system-deps.sh
	bash scripts/install-system-deps.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: install
	$(BIN)/mmguard demo --out $(DEMO_OUT)

bench: install
	$(BIN)/python benchmarks/contrastive.py

bench-lvlm: install
	$(BIN)/python benchmarks/lvlm.py

lint: install
	$(BIN)/ruff check src tests benchmarks

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
