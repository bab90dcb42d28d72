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
