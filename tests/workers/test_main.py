"""The worker's share of a destination's outbound associations."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.config import Config
from workers.main import share_of


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
@pytest.mark.parametrize("concurrency", [1, 2, 3, 5, 16])
def test_shares_add_up_to_the_concurrency_exactly(workers: int, concurrency: int) -> None:
    config = Config(workers=workers, spool=Path("/s"), admin_socket=Path("/s/a.sock"))
    shares = [share_of(config, concurrency, w) for w in range(1, workers + 1)]
    assert sum(shares) == concurrency
    assert max(shares) - min(shares) <= 1
    # The workers with a share are the first ones: where hand-offs go.
    assert all(s > 0 for s in shares[:min(concurrency, workers)])


def test_spool_files_that_cannot_be_made_ahead_are_said_once(
        caplog: pytest.LogCaptureFixture) -> None:
    """A read-only or full spool: tried on every heartbeat, the line came every second
    in each worker (an outside operations campaign). Once until the cause changes,
    and once more when it works again."""
    import asyncio
    import errno
    import logging
    from types import SimpleNamespace

    from workers.main import Worker

    outcomes: list[object] = []

    def stock(step: int) -> bool:
        outcome = outcomes.pop(0)
        if isinstance(outcome, OSError):
            raise outcome
        return bool(outcome)

    worker = SimpleNamespace(_idle=lambda: True, worker_id=1, stock_failed=None,
                             spool=SimpleNamespace(stock=stock, tmp="/spool/tmp"))
    read_only = OSError(errno.EROFS, "Read-only file system")
    full = OSError(errno.ENOSPC, "No space left on device")
    with caplog.at_level(logging.INFO, logger="workers.main"):
        for outcome in (read_only, read_only, read_only, full, False, False):
            outcomes.append(outcome)
            asyncio.run(Worker._stock(worker))  # type: ignore[arg-type]
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 3, said
    assert "Read-only file system" in said[0] and "No space left" in said[1], said
    assert said[2] == "worker 1: spool files are made ahead again in /spool/tmp"
