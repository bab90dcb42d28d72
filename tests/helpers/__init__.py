"""Shared test helpers: ports, subprocesses, DCMTK/Orthanc peers, test data.

Fixtures wrapping these live in ``tests/conftest.py`` (``free_port``, ``procs``, ``dcmtk``,
``orthanc``, ``orthanc_server``). Import helpers from here::

    from tests.helpers import make_ct, run_tool, storescp_server
"""

from .data import make_ct, make_study, make_tiny, pydicom_test_files, same_content, to_bytes
from .dcmtk import (
    Dcmtk,
    StoreSCP,
    dcmqrscp_server,
    dcmtk_env,
    find_dcmtk,
    find_orthanc,
    missing,
    received_files,
    require_dcmtk,
    require_orthanc,
    run_tool,
    start_server,
    storescp_server,
)
from .net import PortTimeout, free_port, wait_for_port
from .orthanc import Orthanc, OrthancError, orthanc_config, start_orthanc
from .procs import Proc, Procs

__all__ = [
    "Dcmtk",
    "Orthanc",
    "OrthancError",
    "PortTimeout",
    "Proc",
    "Procs",
    "StoreSCP",
    "dcmqrscp_server",
    "dcmtk_env",
    "find_dcmtk",
    "find_orthanc",
    "free_port",
    "make_ct",
    "make_study",
    "make_tiny",
    "missing",
    "orthanc_config",
    "pydicom_test_files",
    "received_files",
    "require_dcmtk",
    "require_orthanc",
    "run_tool",
    "same_content",
    "start_orthanc",
    "start_server",
    "storescp_server",
    "to_bytes",
    "wait_for_port",
]
