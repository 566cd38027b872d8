"""Fixtures for the transport tests that talk to the real RabbitMQ broker."""

from __future__ import annotations

import logging

import pytest
from brokerutil import ensure_broker_running, unique_names


@pytest.fixture(autouse=True)
def _pika_quiet_like_the_cli():
    """The command line's logging set-up (``common.setup_logging``) silences pika's
    own multi-line reports; tests see the log lines a user of the CLI sees."""
    pika_log = logging.getLogger("pika")
    level = pika_log.level
    pika_log.setLevel(logging.CRITICAL)
    yield
    pika_log.setLevel(level)


@pytest.fixture(scope="session")
def broker():
    try:
        ensure_broker_running(60)
    except RuntimeError as e:
        pytest.fail(f"these tests need RabbitMQ at 127.0.0.1:5672 ({e})")
    yield
    ensure_broker_running()


@pytest.fixture
def names(broker):
    """Unique exchange and queue names for one test; deleted afterwards."""
    with unique_names() as n:
        yield n
