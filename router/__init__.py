"""The router's main process and the protocol core it shares with the workers."""

from __future__ import annotations

import signal as _signal
import sys as _sys

#: SIGHUPs that reached ``dicom-router run`` before its supervisor handled signals:
#: during the imports and the start (~0.3 s), SIGHUP's default action ended the
#: router (exit 129, not a line logged), so a reload sent right after a start killed
#: it (an outside operations campaign). Held from this first module on; the
#: supervisor takes them up as reloads (router/supervisor.py).
held_signals: list[int] = []
if _sys.argv[1:2] == ["run"]:
    _signal.signal(_signal.SIGHUP, lambda signum, _frame: held_signals.append(signum))
