"""Whom a worker is serving, for the log lines other libraries write meanwhile.

Our own log lines name their association or destination. pydicom's do not: a
warning about a bad Specific Character Set, say, would reach the log with no way
to tell which modality sent the instance. :data:`serving` holds, per asyncio task
(and per thread job that copied the task's context), a callable giving the prefix
to put on such lines; :class:`LibraryLogFilter` puts it there.

Work handed to a thread keeps the prefix only if it runs in the submitter's
context: ``asyncio.to_thread`` copies it, ``loop.run_in_executor`` does not, and
the spool's commit thread runs a routing callable in the context it was submitted
from.
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
from collections.abc import Callable

__all__ = ["REPEAT_WINDOW", "LibraryLogFilter", "serving"]

#: A callable giving "association w1-a3 CT1->ROUTER 10.0.0.7:4242" or "destination
#: pacs": called when a line is logged, so it says what is known by then (the AE
#: titles arrive with the A-ASSOCIATE-RQ). Tasks inherit it (asyncio copies the
#: context when it creates one).
serving: contextvars.ContextVar[Callable[[], str] | None] = contextvars.ContextVar(
    "serving", default=None)

# "/path/to/module.py:738: " before a captured warning's category.
_WARNING_SOURCE = re.compile(r"^.*?:\d+: (?=\w+Warning)")

#: A library's line said again for the same association or destination within this
#: many seconds is dropped: pydicom warns once per value it decodes, so a bad
#: Specific Character Set under rules that read eight attributes was twenty lines
#: for one instance.
REPEAT_WINDOW = 60.0
# (whom, line) pairs remembered for REPEAT_WINDOW; the oldest go past this many.
_REMEMBERED = 1024


class LibraryLogFilter(logging.Filter):
    """Prefix records of other libraries with whom the worker is serving, keep a
    captured Python warning to its message (no file path, no source line), drop
    the one that repeats what pydicom has just logged (its ``warn_and_log`` does
    both: the same warning was two lines), and drop a line already said for the
    same association or destination within :data:`REPEAT_WINDOW` seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._pydicom_said = ""
        self._clock = clock
        self._said: dict[tuple[str, str], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(("workers.", "router.")):
            return True
        if record.name == "pydicom":
            self._pydicom_said = record.getMessage()
        elif record.name == "py.warnings":
            said, self._pydicom_said = self._pydicom_said, ""
            message = _warning_message(record.getMessage())
            if said and message.endswith(f"Warning: {said}"):
                return False
            record.msg, record.args = message, None
        who = serving.get()
        if who is None:
            return True
        whom, message = who(), record.getMessage()
        now, key = self._clock(), (whom, message)
        if now - self._said.get(key, -REPEAT_WINDOW) < REPEAT_WINDOW:
            return False
        self._said.pop(key, None)  # re-inserted last: the dict stays oldest first
        self._said[key] = now
        if len(self._said) > _REMEMBERED:
            del self._said[next(iter(self._said))]
        record.msg, record.args = f"{whom}: {message}", None
        return True


def _warning_message(text: str) -> str:
    """A captured warning's message: warnings.formatwarning gives "path:line:
    Category: message\\n" and, when it has the source, "  source line\\n". The
    message itself may hold newlines (a value pydicom quotes), so only a last line
    indented by two spaces is taken for the source."""
    lines = text.rstrip("\n").split("\n")
    if len(lines) > 1 and lines[-1].startswith("  "):
        lines.pop()
    return _WARNING_SOURCE.sub("", "\n".join(lines), count=1)
