# Two entry points for a fresh machine: `make serve` (the service on embedded defaults) and `make test`.
# Both create .venv and install the project into it first. On a machine without a GPU the CPU build of
# PyTorch is installed first (requirements/torch-cpu.txt); set TORCH_REQUIREMENT to another file, or
# install your own torch into .venv first, to use a CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_REQUIREMENT ?= requirements/torch-cpu.txt
STAMP := $(VENV)/.installed

.PHONY: install serve test test-slow test-all lint bench example clean

$(STAMP): pyproject.toml $(TORCH_REQUIREMENT)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet -r $(TORCH_REQUIREMENT)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/distill serve

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The long end-to-end runs (fault suite, several ranks, real MLflow, browser flows on a busy machine).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow and not gpu"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/loss.py
	$(BIN)/python bench/api.py

example: $(STAMP)
	$(BIN)/python examples/fetch_smollm2.py
	$(BIN)/distill train examples/smollm2-dolly.yaml

clean:
	rm -rf $(VENV) .distill .pytest_cache
