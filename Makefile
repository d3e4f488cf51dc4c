# lorastack: the two commands a new user needs are `make quickstart` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lorastack-setup

.PHONY: setup quickstart test test-fast bench lint clean-venv

## setup: create .venv and install everything (seconds when nothing changed)
setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	@touch $@

## quickstart: set up, fetch the default model and the data, train the two example adapters
## (skipped when already trained with the same config), then serve them and show curl examples
quickstart: setup
	$(BIN)/lorastack models pull
	$(BIN)/lorastack data pull
	$(BIN)/lorastack train reviews-classify --if-missing
	$(BIN)/lorastack train reviews-condition --if-missing
	$(BIN)/lorastack models list
	$(BIN)/lorastack data list
	$(BIN)/lorastack adapters list
	bash scripts/quickstart-serve.sh

## test: set up if needed, then run the whole test suite
test: setup
	$(BIN)/python -m pytest

## test-fast: only the tests that need no real model
test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

## bench: every benchmark in bench/ (about an hour on 2 cores; run it alone), then the README's
## Performance and Quality sections are regenerated from bench/results/
bench: setup
	$(BIN)/lorastack models pull
	$(BIN)/lorastack data pull
	$(BIN)/lorastack train reviews-classify --if-missing
	$(BIN)/lorastack train reviews-condition --if-missing
	$(BIN)/python -m bench.training
	$(BIN)/python -m bench.memory
	$(BIN)/python -m bench.memory_plan
	$(BIN)/python -m bench.serving
	$(BIN)/python -m bench.hotswap
	$(BIN)/python -m bench.classify
	$(BIN)/python -m bench.engine_tuning
	$(BIN)/python -m bench.fuzz
	$(BIN)/python -m bench.lora_ops
	$(BIN)/python -m bench.label_eval
	$(BIN)/python -m bench.quality
	$(BIN)/python -m bench.ceilings
	$(BIN)/python -m bench.families
	$(BIN)/python -m bench.report

lint: setup
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV)
