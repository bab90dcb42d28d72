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
from collections.abc import Callable

__all__ = ["LibraryLogFilter", "serving"]

#: A callable giving "association w1-a3 CT1->ROUTER 10.0.0.7:4242" or "destination
#: pacs": called when a line is logged, so it says what is known by then (the AE
#: titles arrive with the A-ASSOCIATE-RQ). Tasks inherit it (asyncio copies the
#: context when it creates one).
serving: contextvars.ContextVar[Callable[[], str] | None] = contextvars.ContextVar(
    "serving", default=None)

# "/path/to/module.py:738: " before a captured warning's category.
_WARNING_SOURCE = re.compile(r"^.*?:\d+: (?=\w+Warning)")


class LibraryLogFilter(logging.Filter):
    """Prefix records of other libraries with whom the worker is serving, keep a
    captured Python warning on one line (no file path, no source line), and drop
    the one that repeats what pydicom has just logged (its ``warn_and_log`` does
    both: the same warning was two lines)."""

    def __init__(self) -> None:
        super().__init__()
        self._pydicom_said = ""

    def filter(self, record: logging.LogRecord) -> bool:
        who = serving.get()
        if record.name == "pydicom":
            self._pydicom_said = record.getMessage()
        elif record.name == "py.warnings":
            first_line = _WARNING_SOURCE.sub("", record.getMessage().split("\n", 1)[0])
            said, self._pydicom_said = self._pydicom_said, ""
            if said and first_line.endswith(f"Warning: {said}"):
                return False
            record.msg, record.args = first_line, None
        if who is not None and not record.name.startswith(("workers.", "router.")):
            record.msg = f"{who()}: {record.getMessage()}"
            record.args = None
        return True
