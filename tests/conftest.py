"""Fixtures shared by the whole suite; the helpers behind them are in tests/helpers/.

- ``free_port``: a free TCP port on 127.0.0.1 (int).
- ``procs``: a ``Procs`` to start subprocesses with; all stopped at teardown, their logs
  attached to the report of a failed test.
- ``dcmtk``: the DCMTK tool paths (``Dcmtk``); skips if not installed, fails under CI=true.
- ``orthanc``: path of the Orthanc binary; same skip/fail rule.
- ``orthanc_server``: a running Orthanc (``tests.helpers.Orthanc``) on free ports, with its
  own config and storage in ``tmp_path/orthanc``; killed at teardown.

Every test gets its own ports and tmp_path, so the suite can run in parallel.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.helpers import Dcmtk, Orthanc, Procs, require_dcmtk, require_orthanc, start_orthanc
from tests.helpers import free_port as _free_port

_PROCS = pytest.StashKey[Procs]()


@pytest.fixture
def free_port() -> int:
    """A TCP port free on 127.0.0.1 a moment ago (see ``tests.helpers.free_port``)."""
    return _free_port()


@pytest.fixture
def procs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Procs]:
    """Subprocesses of this test, logging to ``tmp_path/procs/``; stopped at teardown."""
    group = Procs(tmp_path / "procs")
    request.node.stash[_PROCS] = group
    try:
        yield group
    finally:
        group.stop_all()


@pytest.fixture(scope="session")
def dcmtk() -> Dcmtk:
    """Paths of the DCMTK tools (``dcmtk.storescu``...), ``dcmtk.run(tool, *args)``."""
    return require_dcmtk()


@pytest.fixture(scope="session")
def orthanc() -> str:
    """Path of the Orthanc server binary."""
    return require_orthanc()


@pytest.fixture
def orthanc_server(orthanc: str, procs: Procs, tmp_path: Path) -> Iterator[Orthanc]:
    """Orthanc as AE ``ORTHANC`` on 127.0.0.1 (see ``tests.helpers.start_orthanc``).

    Killed at teardown rather than stopped: its graceful stop takes 3.5 s, and its
    storage goes with ``tmp_path``. For other AE titles, modalities or settings, call
    ``start_orthanc(procs, tmp_path / "...", ...)`` in the test.
    """
    server = start_orthanc(procs, tmp_path / "orthanc", binary=orthanc)
    try:
        yield server
    finally:
        server.kill()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    """On failure, stop the test's processes and attach their logs to the report.

    Stopping first makes the logs complete (DCMTK buffers its stdout when it is a file).
    """
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    group = item.stash.get(_PROCS, None)
    if group is None or not report.failed or report.when == "teardown" or not len(group):
        return
    group.stop_all()
    report.sections.append(("subprocess logs", group.logs()))
