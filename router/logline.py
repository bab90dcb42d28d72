"""One log record, one line: control characters in a message are escaped.

Log lines carry text that peers choose: an Error Comment a destination sent, a
value pydicom warns about (an unknown Specific Character Set, say), an exception
quoting a data set. A newline in such text would start a line of its own that
reads like the router's ("... C-STORE ... status 0x0000"), so a peer could forge the
record a site searches when a study is missing. The message part of every line is
therefore escaped (``\\n``, ``\\r``, ``\\x1b``...); a traceback, which the router does
not log for bad input, keeps its lines.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import Final

__all__ = ["OneLineFormatter", "Throttle", "configure", "first_line"]

# C0 controls but TAB, and DEL: escaped as Python writes them in a repr.
_ESCAPES: Final = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F) if c != 0x09} | {
    0x0A: "\\n", 0x0D: "\\r"}


class OneLineFormatter(logging.Formatter):
    """A Formatter whose ``%(message)s`` never spans lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = record.message
        if not message.isprintable():  # cheap on the usual, printable, line
            record.message = message.translate(_ESCAPES)
        return super().formatMessage(record)


def configure(level: int | str, fmt: str) -> None:
    """``logging.basicConfig(level=level, format=fmt)`` with one line per record."""
    logging.basicConfig(level=level, format=fmt)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(OneLineFormatter(fmt))


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type's name): some of
    pydicom's messages carry a whole traceback."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class Throttle:
    """A log budget per key, for lines that strangers can cause at will.

    A failed TLS handshake or a bad PROXY header is one line each; a port scan, a
    load balancer's health check aimed at the wrong port or a modality retrying in a
    loop made hundreds a second of the same line, and the one line a site looks for
    scrolled away. Each key (what failed, and from which address) gets ``burst``
    lines per ``period`` seconds; further ones are counted, and :meth:`due` gives the
    counts of periods that ended, for one summary line each: nothing is hidden, it
    is said once. At most ``keys`` keys are tracked (a scan from many addresses);
    past that, new keys share :attr:`OTHERS`. Sans clock: the caller gives the time.
    """

    OTHERS: Final = "other addresses"

    __slots__ = ("_burst", "_due", "_keys", "_period", "_windows")

    def __init__(self, *, burst: int = 5, period: float = 60.0, keys: int = 1024) -> None:
        self._burst = burst
        self._period = period
        self._keys = keys
        # key -> [when its period started, lines let through, lines held back]
        self._windows: dict[tuple[str, Hashable], list[float]] = {}
        self._due: list[tuple[str, Hashable, int, float]] = []

    def allow(self, what: str, who: Hashable, now: float) -> bool:
        """Whether to log this line about ``what`` happening with ``who``."""
        key = (what, who)
        window = self._windows.get(key)
        if window is not None and now - window[0] >= self._period:
            self._end(key, window, now)
            window = None
        if window is None:
            if who != self.OTHERS and len(self._windows) >= self._keys:
                self._expire(now)
                if len(self._windows) >= self._keys:  # one OTHERS per ``what`` beyond
                    return self.allow(what, self.OTHERS, now)
            window = self._windows[key] = [now, 0, 0]
        if window[1] < self._burst:
            window[1] += 1
            return True
        window[2] += 1
        return False

    def due(self, now: float, *, everything: bool = False) -> list[tuple[str, Hashable, int,
                                                                       float]]:
        """(what, who, lines held back, over how many seconds) for each period that
        ended by ``now`` (every period with ``everything``, as the process stops)."""
        self._expire(now, everything=everything)
        due, self._due = self._due, []
        return due

    def _expire(self, now: float, *, everything: bool = False) -> None:
        for key, window in list(self._windows.items()):
            if everything or now - window[0] >= self._period:
                self._end(key, window, now)

    def _end(self, key: tuple[str, Hashable], window: list[float], now: float) -> None:
        del self._windows[key]
        if window[2]:
            self._due.append((*key, int(window[2]), min(now - window[0], self._period)))
