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

# The main job: the node daemon on deploy/demo.toml (a real street clip as the camera,
# the reference teacher, a student adapting under a budget that forces checkpointing,
# updates to the outbox and to a local broker if one answers) for 100 s.
DEMO := .demo
run: $(STAMP)
	@mkdir -p $(DEMO) && chmod 700 $(DEMO)
	@test -s $(DEMO)/hmac.key || (umask 077 && head -c 32 /dev/urandom > $(DEMO)/hmac.key)
	$(BIN)/waggle-trainer run --config deploy/demo.toml --duration 100 $(ARGS)

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
