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
from dataclasses import dataclass
from typing import Final

__all__ = ["Held", "OneLineFormatter", "Throttle", "configure", "duration", "first_line"]

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


@dataclass(frozen=True, slots=True)
class Held:
    """What a :class:`Throttle` held back of one kind of line, for its summary line."""

    what: str
    lines: int  # held back, in all
    addresses: int  # how many addresses they came from
    more_addresses: bool  # and more than that: past the key bound, not told apart
    top: Hashable  # the address most of them came from
    top_lines: int
    seconds: float  # over how long


class Throttle:
    """A log budget for lines that strangers can cause at will.

    A failed TLS handshake or a bad PROXY header is one line each; a port scan, a
    load balancer's health check aimed at the wrong port or a modality retrying in a
    loop made hundreds a second of the same line, and the one line a site looks for
    scrolled away. Each kind of line (``what``) gets ``burst`` lines per ``period``
    seconds from one address (``who``), and ``kind_burst`` from all addresses
    together (a scan comes from many; so do the addresses of one IPv6 host);
    further ones are counted, and :meth:`due` gives, per kind, what was held back in
    periods that ended, for one summary line: nothing is hidden, it is said once. At
    most ``keys`` addresses are told apart; past that, new ones share
    :attr:`OTHERS`. The budget is the process's own (each worker has one). Sans
    clock: the caller gives the time.
    """

    OTHERS: Final = "other addresses"

    __slots__ = ("_burst", "_due", "_keys", "_kind_burst", "_kinds", "_period", "_windows")

    def __init__(self, *, burst: int = 5, kind_burst: int = 20, period: float = 60.0,
                 keys: int = 1024) -> None:
        self._burst = burst
        self._kind_burst = kind_burst
        self._period = period
        self._keys = keys
        # (what, who) -> [when its period started, lines let through, lines held back]
        self._windows: dict[tuple[str, Hashable], list[float]] = {}
        # what -> [when its period started, lines let through]
        self._kinds: dict[str, list[float]] = {}
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
        kind = self._kinds.get(what)
        if kind is None or now - kind[0] >= self._period:
            kind = self._kinds[what] = [now, 0]
        if window[1] < self._burst and kind[1] < self._kind_burst:
            window[1] += 1
            kind[1] += 1
            return True
        window[2] += 1
        return False

    def due(self, now: float, *, everything: bool = False) -> list[Held]:
        """What was held back, per kind, in the periods that ended by ``now`` (every
        period with ``everything``, as the process stops)."""
        self._expire(now, everything=everything)
        due, self._due = self._due, []
        by_kind: dict[str, list[tuple[Hashable, int, float]]] = {}
        for what, who, lines, seconds in due:
            by_kind.setdefault(what, []).append((who, lines, seconds))
        held = []
        for what, entries in by_kind.items():
            top, top_lines, _ = max(entries, key=lambda entry: entry[1])
            others = any(who == self.OTHERS for who, _, _ in entries)
            held.append(Held(what=what, lines=sum(lines for _, lines, _ in entries),
                             addresses=len(entries) - others, more_addresses=others,
                             top=top, top_lines=top_lines,
                             seconds=max(seconds for _, _, seconds in entries)))
        if everything:
            self._kinds.clear()
        return held

    def _expire(self, now: float, *, everything: bool = False) -> None:
        for key, window in list(self._windows.items()):
            if everything or now - window[0] >= self._period:
                self._end(key, window, now)
        for what, kind in list(self._kinds.items()):
            if now - kind[0] >= self._period:
                del self._kinds[what]

    def _end(self, key: tuple[str, Hashable], window: list[float], now: float) -> None:
        del self._windows[key]
        if window[2]:
            self._due.append((*key, int(window[2]), min(now - window[0], self._period)))


def duration(seconds: float) -> str:
    """``seconds`` for a log line or a status table: "3 d 2 h", "5 h 10 min", "42 s"."""
    whole = max(0, int(seconds))
    days, hours, minutes = whole // 86400, whole % 86400 // 3600, whole % 3600 // 60
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {whole % 60} s" if minutes else f"{whole} s"
