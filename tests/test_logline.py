"""router.logline: a log record is one line whatever text a peer put into it."""

from __future__ import annotations

import io
import logging

from router.logline import Held, OneLineFormatter, Throttle


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


TLS = "failed TLS handshakes on port 2762"


def test_throttle_lets_a_burst_through_per_address_and_counts_the_rest() -> None:
    budget = Throttle(burst=3, period=60.0)
    said = [budget.allow(TLS, "10.0.0.7", t) for t in range(10)]
    assert said == [True] * 3 + [False] * 7
    # Another address, or another failure, has its own budget.
    assert budget.allow(TLS, "10.0.0.8", 10.0)
    assert budget.allow("connections without a good PROXY header on port 11113",
                        "10.0.0.7", 10.0)
    assert budget.due(59.0) == []  # nothing held back is said before its period ends
    assert budget.due(60.0) == [Held(what=TLS, lines=7, addresses=1, more_addresses=False,
                                     top="10.0.0.7", top_lines=7, seconds=60.0)]
    assert budget.due(61.0) == []  # said once
    # A new period: a new burst.
    assert budget.allow(TLS, "10.0.0.7", 61.0)


def test_throttle_says_what_it_held_when_a_period_ends_on_a_new_line() -> None:
    budget = Throttle(burst=1, period=10.0)
    assert budget.allow("x", "a", 0.0)
    assert not budget.allow("x", "a", 1.0)
    assert budget.allow("x", "a", 30.0)  # the old period ended: its count is due
    assert [(h.what, h.lines, h.top) for h in budget.due(30.0)] == [("x", 1, "a")]


def test_a_scan_from_many_addresses_is_bounded_in_lines_too() -> None:
    """A review: each new address had its own 5 lines, so 2,600 addresses in 1.6 s
    wrote 2,058 lines. A kind of line has a budget of its own, over all addresses,
    and the summary is one line per kind."""
    budget = Throttle(burst=5, kind_burst=20, period=60.0)
    said = [budget.allow(TLS, f"10.1.{i // 256}.{i % 256}", 1.0 + i / 1000)
            for i in range(2600)]
    assert sum(said) == 20
    held = budget.due(120.0)
    # 1,024 addresses told apart (20 of them logged, nothing held), the rest together.
    assert [(h.lines, h.addresses, h.more_addresses) for h in held] == [(2580, 1004, True)]
    # The kind's budget is back with a new period.
    assert budget.allow(TLS, "10.9.9.9", 121.0)


def test_throttle_at_its_key_bound_counts_new_addresses_together() -> None:
    """Memory stays bounded and nothing held back goes unsaid; what does not fit is
    counted under one key."""
    budget = Throttle(burst=1, kind_burst=1000, period=60.0, keys=4)
    said = [budget.allow("x", f"10.0.0.{i}", 1.0) for i in range(10)]
    assert said == [True] * 4 + [True] + [False] * 5  # four own keys, then one shared
    assert len(budget._windows) == 5
    assert budget.due(2.0, everything=True) == [Held(
        what="x", lines=5, addresses=0, more_addresses=True, top=Throttle.OTHERS,
        top_lines=5, seconds=1.0)]
    assert budget.due(3.0) == [] and not budget._windows


def test_throttle_on_stop_says_everything_held() -> None:
    budget = Throttle(burst=1, period=60.0)
    for t in range(4):
        budget.allow("x", "a", float(t))
        budget.allow("x", "b", float(t))
    held = budget.due(5.0, everything=True)
    assert [(h.lines, h.addresses, h.top_lines, h.seconds) for h in held] == [(6, 2, 3, 5.0)]
