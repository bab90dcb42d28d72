"""What the benchmarks share: finding DCMTK's binaries and generating test data.

Imported with the repository root on ``sys.path`` (each benchmark puts it there).
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.helpers.data import make_ct, make_tiny
from tests.helpers.dcmtk import which_binary


def dcmtk_binary(name: str) -> str:
    """DCMTK's ``name`` (not pynetdicom's script of the same name), or exit saying so."""
    path = which_binary(name)
    if path is None:
        sys.exit(f"{name} not found: install DCMTK (scripts/setup --system)")
    return path


def make_data(root: Path, kind: str, count: int, streams: int, *,
              size_kb: float = 500) -> list[Path]:
    """``count`` instances ("ct" of ``size_kb``, or "tiny") split over ``streams``
    folders, one per sender."""
    dirs = [root / f"{kind}-{i}" for i in range(streams)]
    for d in dirs:
        d.mkdir(parents=True)
    for i in range(count):
        path = dirs[i % streams] / f"{i:06d}.dcm"
        if kind == "ct":
            make_ct(path, size_kb=size_kb, seed=i)
        else:
            make_tiny(path, seed=i)
    return dirs
