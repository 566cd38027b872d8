"""systemd's notify protocol over ``$NOTIFY_SOCKET``, with the standard library.

A datagram of newline-separated ``KEY=value`` assignments to the socket systemd
names in ``$NOTIFY_SOCKET`` (a path, or an abstract socket name starting with
``@``).  Without the variable (not started by systemd, or ``Type=simple``) every
call does nothing and returns False, so the daemon runs the same way from a shell.

Messages the daemon sends: ``READY=1`` (config, models and plan loaded),
``STATUS=...`` (one human-readable line: round, agreement, budget, outbox),
``WATCHDOG=1`` (progress since the last ping), ``WATCHDOG_USEC=N`` (a longer
watchdog once the plan's step time is known), ``STOPPING=1``.

``$WATCHDOG_USEC`` / ``$WATCHDOG_PID`` say whether systemd expects pings and how
often (:func:`watchdog_interval_s`).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Sends notify messages; a no-op without ``$NOTIFY_SOCKET``."""

    def __init__(self, address: str | None = None):
        addr = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self.address: str | None = None
        self._sock: socket.socket | None = None
        self._warned = False
        if not addr:
            return
        if addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace
        elif not addr.startswith("/"):
            log.warning(
                "NOTIFY_SOCKET=%r is neither a path nor an abstract name; not notifying", addr
            )
            return
        self.address = addr
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines (keyword names are upper-cased); True if sent."""
        if self._sock is None or self.address is None:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value).replace("\n", " ")
            lines.append(f"{key.upper()}={text}")
        try:
            self._sock.sendto("\n".join(lines).encode("utf-8", "replace"), self.address)
        except OSError as exc:
            if not self._warned:  # once: a gone manager must not flood the journal
                log.warning("sd_notify to %r failed: %s", os.environ.get("NOTIFY_SOCKET"), exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify(READY=1, **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def extend_watchdog(self, seconds: float) -> bool:
        """Ask systemd for a different watchdog timeout from now on."""
        return self.notify(WATCHDOG_USEC=int(seconds * 1_000_000))

    def stopping(self, status: str | None = None) -> bool:
        return self.notify(STOPPING=1, **({"STATUS": status} if status else {}))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval_s() -> float | None:
    """The watchdog timeout systemd set for this process (seconds), or None.

    None when ``$WATCHDOG_USEC`` is unset or invalid, or when ``$WATCHDOG_PID``
    names another process (the variable was inherited)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None
