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
from typing import Final

__all__ = ["OneLineFormatter", "configure", "first_line"]

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
