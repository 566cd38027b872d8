# Two commands for a fresh machine: `make run` and `make test` (see README.md).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test check bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,demo]'
	touch $(STAMP)

# The main job on embedded defaults: a memory-planned training run of the student
# on this machine (no camera, broker or weights needed), plan and measurements printed.
run: $(STAMP)
	$(BIN)/waggle-trainer run $(ARGS)

# Lint and types (configuration in pyproject.toml); part of `make test`.
check: $(STAMP)
	$(BIN)/ruff check waggle_trainer tests bench
	$(BIN)/mypy

# The whole suite, including the tests that talk to RabbitMQ at 127.0.0.1:5672.
test: check
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
