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

# The main job, the whole loop (waggle_trainer/demo.py): the node daemon on
# deploy/demo.toml (a real street clip as the camera, the reference teacher, a student
# adapting under a budget that forces checkpointing) and, when a broker answers at
# 127.0.0.1:5672, the server on deploy/demo-server.toml that aggregates its updates into
# versions the node adopts; the learning curve in .demo/learning-curve.svg at the end.
run: $(STAMP)
	$(BIN)/waggle-trainer demo $(ARGS)

# Lint and types (configuration in pyproject.toml); part of `make test`.
check: $(STAMP)
	$(BIN)/ruff check waggle_trainer tests bench
	$(BIN)/ruff format --check waggle_trainer tests bench
	$(BIN)/mypy

# The whole suite, including the tests that talk to RabbitMQ at 127.0.0.1:5672.
test: check
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
