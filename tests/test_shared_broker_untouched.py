"""The shared broker at 127.0.0.1:5672 is never restarted or reconfigured by a test:
anything else using it at the time would break (and it made runs flaky).  A test that
needs a broker to die, to lose its connections or to change a setting starts its own
node (``tests/transport/tlsbroker.py``: ``start_plain_broker``, ``PrivateBroker.ctl``)."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# rabbitmqctl sub-commands that stop, restart or reconfigure a node, or cut its clients
DISRUPTIVE = (
    "stop_app",
    "start_app",
    "stop",
    "reset",
    "force_reset",
    "eval",
    "close_all_connections",
    "close_connection",
    "set_vm_memory_high_watermark",
    "set_disk_free_limit",
    "set_global_parameter",
    "set_policy",
    "set_operator_policy",
)


def test_no_test_stops_or_reconfigures_the_shared_broker():
    calls = re.compile(r"""\brabbitmqctl\(\s*["']([a-z_]+)["']""")
    found = []
    for path in TESTS.rglob("*.py"):
        for m in calls.finditer(path.read_text()):
            if m.group(1) in DISRUPTIVE:
                found.append(f"{path.relative_to(TESTS)}: rabbitmqctl {m.group(1)}")
    assert found == [], found
