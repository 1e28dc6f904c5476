# Two commands on a fresh clone: `make serve` and `make test`. Each does all of its own set-up,
# idempotently: virtualenv, llama-cpp-python build (cached per CMAKE_ARGS), the default model.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# A different CMAKE_ARGS (CUDA, Metal) is a different build: re-run the install for it.
STAMP := $(VENV)/.installed-$(shell printf '%s' "$$CMAKE_ARGS" | sha256sum | cut -c1-12)

.PHONY: serve test setup model lint format clean

$(STAMP): pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) scripts/install.sh $(VENV) dev
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

model: setup
	$(BIN)/codeserve pull

serve: model
	$(BIN)/codeserve serve

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: model lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
