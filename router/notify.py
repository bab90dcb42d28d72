"""Telling the service manager how the router is doing: the sd_notify(3) protocol.

Under systemd with ``Type=notify`` (deploy/systemd/dicom-router.service), the unit
counts as started only when the supervisor says ``READY=1`` -- once every worker
has said hello, so ``systemctl start`` returns when associations are served and
a unit ordered after it finds the router answering. A reload is bracketed by
``RELOADING=1`` and ``READY=1``, a drain says ``STOPPING=1``, and ``STATUS=``
is the line ``systemctl status`` shows.

With ``WatchdogSec=`` in the unit, systemd sets ``WATCHDOG_USEC``; the
supervisor's loop then pings ``WATCHDOG=1`` at half that period from the same
poll loop that accepts connections and watches the workers, so a supervisor
that hangs (stuck in a call, a deadlock) is killed and restarted by systemd.
Workers are not its business: the supervisor already replaces one that stops
heartbeating.

The protocol is one datagram per message on the AF_UNIX socket named by
``NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace), newline-separated
``KEY=value`` lines. Without ``NOTIFY_SOCKET`` (not under systemd, ``Type=exec``)
every call does nothing. A failed send is logged once and never stops the router:
the service manager's view is not worth an association.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier", "service_manager_variables"]

log = logging.getLogger("router.notify")

#: The variables systemd sets for the main process only; a child must not inherit
#: them (it would ping in the supervisor's name).
service_manager_variables = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """sd_notify(3) for one process; see the module docstring."""

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self.address: str | bytes | None = None
        self.name = address or ""
        if address:
            # "@name" is Linux's abstract namespace: a leading NUL byte on the wire.
            self.address = b"\0" + address[1:].encode() if address.startswith("@") \
                else address
        #: Seconds between two WATCHDOG=1, or None without a watchdog.
        self.watchdog_interval = (watchdog_usec / 2e6 if watchdog_usec and self.address
                                  else None)
        self._sock: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None,
                         pid: int | None = None) -> Notifier:
        """The notifier systemd set up for this process (sd_watchdog_enabled(3)
        rules: ``WATCHDOG_PID``, when set, must be ours)."""
        environ = os.environ if environ is None else environ
        pid = os.getpid() if pid is None else pid
        watchdog: int | None = None
        try:
            usec = int(environ.get("WATCHDOG_USEC", ""))
            owner = environ.get("WATCHDOG_PID", "")
            if usec > 0 and (not owner or int(owner) == pid):
                watchdog = usec
        except ValueError:
            watchdog = None
        return cls(environ.get("NOTIFY_SOCKET"), watchdog_usec=watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def ready(self, status: str) -> None:
        self.send(READY="1", STATUS=status)

    def reloading(self) -> None:
        # MONOTONIC_USEC: systemd >= 253 (Type=notify-reload) matches it with the
        # reload it asked for; older ones ignore it.
        self.send(RELOADING="1", MONOTONIC_USEC=str(time.clock_gettime_ns(
            time.CLOCK_MONOTONIC) // 1000))

    def stopping(self, status: str) -> None:
        self.send(STOPPING="1", STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def watchdog(self) -> None:
        self.send(WATCHDOG="1")

    def send(self, **fields: str) -> None:
        if self.address is None:
            return
        message = "".join(f"{key}={value.replace(chr(10), ' ')}\n"
                          for key, value in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message.encode(), self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("cannot notify the service manager at %s: %s (said once "
                            "until a notification gets through)", self.name, exc)
        else:
            self._failed = False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
