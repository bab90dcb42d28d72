"""router.logline: a log record is one line whatever text a peer put into it."""

from __future__ import annotations

import io
import logging

from router.logline import OneLineFormatter


def _formatted(message: str, *args: object) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLineFormatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("tests.logline")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning(message, *args)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_a_newline_in_peer_text_cannot_start_a_line_of_its_own() -> None:
    forged = "x\n2026-11-26 07:00:00,000 INFO worker-1 workers.actor: association w1-a1 " \
             "FAKE->ROUTER closed: released\r\x1b[2K"
    out = _formatted("forward pacs: status 0xA700 (%s)", forged)
    assert out.count("\n") == 1 and out.endswith("\n")
    assert "(x\\n2026-11-26" in out and "released\\r\\x1b[2K)" in out


def test_printable_text_and_tabs_are_left_alone() -> None:
    assert _formatted("C-STORE %s\tstatus 0x%04X", "1.2.3", 0) == \
        "WARNING tests.logline: C-STORE 1.2.3\tstatus 0x0000\n"
