"""The README's first command, ``scripts/run``, as an operator types it."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from tests.helpers.net import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_scripts_run_takes_relative_paths_from_where_it_is_typed(tmp_path: Path) -> None:
    """`scripts/run --config router.toml` from the folder holding router.toml said
    "router.toml: cannot read": the script changed to the checkout first, so a
    relative --spool landed inside it too (an outside campaign)."""
    (tmp_path / "router.toml").write_text(
        f'[router]\nworkers = 1\n[[router.listen]]\nhost = "127.0.0.1"\nport = {free_port()}\n'
        '[spool]\npath = "spool-from-file"\n')
    proc = subprocess.Popen([str(ROOT / "scripts" / "run"), "--config", "router.toml"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "ready: 1 workers serving" in line or "ERROR" in line:
                break
        assert "ready" in line, line
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    # [spool] path is relative to the file (as documented); the file is found from here.
    assert (tmp_path / "spool-from-file").is_dir()
