# Two commands on a fresh clone: `make serve` and `make test`. Each does all of its own set-up,
# idempotently: virtualenv, llama-cpp-python build (cached per CMAKE_ARGS), the default model.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# A different CMAKE_ARGS (CUDA, Metal) is a different build: re-run the install for it.
KEY := $(shell printf '%s' "$$CMAKE_ARGS" | sha256sum | cut -c1-12)
# Serving installs codeserve alone; developing and testing add the tools' extras (dev includes
# bench and quantize), so a `make serve` brings no plotting or benchmark-only package.
SERVE_STAMP := $(VENV)/.installed-serve-$(KEY)
DEV_STAMP := $(VENV)/.installed-dev-$(KEY)
# What the install builds from: the dependencies, the recipe, the patches it applies to llama.cpp.
INSTALL_INPUTS := pyproject.toml scripts/install.sh $(wildcard patches/*/*.patch)

.PHONY: serve test setup model lint typecheck format clean

$(SERVE_STAMP): $(INSTALL_INPUTS)
	PYTHON=$(PYTHON) scripts/install.sh $(VENV)
	rm -f $(VENV)/.installed-serve-* && touch $@

# A dev install is also a serving install: it stamps both.
$(DEV_STAMP): $(INSTALL_INPUTS)
	PYTHON=$(PYTHON) scripts/install.sh $(VENV) dev
	rm -f $(VENV)/.installed-* && touch $@ $(SERVE_STAMP)

setup: $(DEV_STAMP)

model: setup
	$(BIN)/codeserve pull

serve: $(SERVE_STAMP)
	$(BIN)/codeserve pull
	$(BIN)/codeserve serve

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: model lint typecheck
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
