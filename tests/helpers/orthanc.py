"""Orthanc as an independent PACS peer: its own config, free ports, tmp storage, a REST client.

``start_orthanc(procs, workdir)`` writes ``workdir/orthanc.json`` (storage and index in
``workdir``), starts Debian's Orthanc 1.10.1 on two free ports and returns an ``Orthanc``
once both listen and ``GET /system`` names our AE title and ports. The REST helpers use
urllib, each call with a timeout.

Facts about Orthanc 1.10.1 (Debian 12, linked to DCMTK 3.6.7) that shape this module
------------------------------------------------------------------------------------
Bytes. What ``GET /instances/{id}/file`` returns depends on how the instance came in.

- By C-STORE: never the sender's file byte for byte. Orthanc parses the data set (DCMTK)
  and writes a new Part 10 file: 128 zero bytes, ``DICM``, a new meta group, the data set
  as DCMTK encodes it, in the transfer syntax of the presentation context (no
  transcoding).

  - Meta group: rebuilt. (0002,0000) recomputed; Media Storage SOP Class/Instance UID
    from the data set; Implementation Class UID ``1.2.276.0.7230010.3.0.3.6.7`` and
    Version Name ``OFFIS_DCMTK_367`` (DCMTK's, replacing the sender's); no Source
    Application Entity Title (0002,0016). The calling AE title is in the instance's
    metadata instead (``GET /instances/{id}/metadata?expand``: ``RemoteAET``,
    ``RemoteIP``, ``CalledAET``, ``TransferSyntax``...).
  - Data set: DCMTK's encoding of what arrived, in the transfer syntax it arrived in.
    That is the bytes on the wire whenever the sender already encodes that way: for
    everything DCMTK's storescu sends (Orthanc's data set equals what storescp ``+B``
    gets from the same ``storescu -R`` command for 58 of the 59 pydicom test files both
    receive; the exception is deflate, see (d)), and for make_ct/make_study files in
    implicit LE, explicit LE and explicit big endian (stored big endian). Sent as is
    (by our client, or pynetdicom's chunked mode), 36 of the 52 pydicom test files
    Orthanc stores come back with identical data sets. Group length elements and Data
    Set Trailing Padding (FFFC,FFFC) are kept (storescu drops the padding: CT_small.dcm
    reaches Orthanc 138 bytes shorter through storescu than sent as is). The other 16
    are re-encoded where (a) sequences and items of undefined length get explicit
    lengths (reportsi.dcm 2624 -> 2296 bytes, waveform_ecg.dcm, liver_1frame.dcm, the
    JPEG 2000 files' Source Image Sequence), (b) encapsulated Pixel Data with VR OW is
    written OB (MR_small_jp2klossless.dcm, SC_rgb_rle_16bit.dcm: same length, two bytes
    differ), (c) a value of spaces only becomes empty (examples_ybr_color.dcm's Ethnic
    Group), (d) deflated data sets are inflated and deflated again: same content,
    different bytes (20316 -> 20536 bytes for a 20 KiB make_ct).
- By REST (``POST /instances``, ``Orthanc.upload``): stored verbatim, meta and preamble
  included; ``/file`` gives back the uploaded bytes (all 61 pydicom files it accepts).

C-STORE statuses (observed; Orthanc's StoreScp.cpp derives from DCMTK's storescp):

- SOP class DCMTK does not know (e.g. a private UID): with ``UnknownSopClassAccepted``
  false its presentation context is rejected, result 3 (abstract syntax not supported);
  Orthanc acknowledges the association even when no context is left (the SCU then
  releases or aborts). With it true (our default) the instance is stored, 0000H.
- Affected SOP Class UID or Affected SOP Instance UID not those of the data set: A900H
  (also pydicom's rtplan.dcm, rtdose.dcm, rtdose_expb.dcm, badVR.dcm..., whose meta and
  data set SOP Instance UIDs differ, sent as is).
- C000H (Cannot understand) for pydicom's rtdose_rle*.dcm, on which Orthanc's DCMTK
  warns "Length of element (7fe0,0010) is not a multiple of 2 (VR=OW)" (StoreScp.cpp
  answers C000H when DCMTK finds no SOP Class/Instance UID in what it parsed).
- Study or Series Instance UID missing: A700H ("Out of resources": Orthanc answers A700H
  for any error while storing, logging "required tags ... are missing"). A missing
  Patient ID is fine: 0000H.
- A data set DCMTK cannot parse (garbage bytes, implicit VR under an explicit syntax as
  in SC_rgb_jpeg.dcm): no C-STORE-RSP at all; Orthanc logs "DIMSE Failed to receive
  message" and aborts the association only after ``DicomScpTimeout`` seconds.
- The same SOP Instance UID again: 0000H whatever ``OverwriteInstances`` says; with true
  (our default) the new copy replaces the old one (same Orthanc ID, which is a hash of
  the patient, study, series and instance identifiers), with false the old one silently
  stays. REST upload says ``"Success"`` or ``"AlreadyStored"`` respectively.

Time (2 CPUs): process start to both ports listening and ``/system`` answered: 80 ms
(78 - 81 ms, 10 runs; Orthanc's own log shows 40 ms from its first line to "Orthanc has
started"). Graceful stop (SIGTERM) always takes 3.5 s: it notices the signal within
0.2 s, then its HTTP server takes 1.8 s and its DICOM server 1 s to stop. SIGKILL takes
milliseconds and the storage is a tmp dir: ``Orthanc.kill()``, which the
``orthanc_server`` fixture calls at teardown.

Gotchas:

- No listen-address option, DICOM or HTTP: both bind 0.0.0.0. With
  ``RemoteAccessAllowed`` false, HTTP clients not on the loopback get 401; DICOM
  associations from other hosts are accepted (a C-ECHO via the eth0 address succeeds).
- Orthanc's DCMTK leaves Nagle on unless its environment has ``TCP_NODELAY=1``: without
  it each C-STORE to Orthanc takes 45 ms (20 tiny files: 0.90 s), with it 2 ms (0.04 s).
  Orthanc gets ``dcmtk_env()``.
- SIGTERM before "Orthanc has started" kills it outright (its handler is installed
  last); harmless here.
- It needs no HOME and no locale (runs under ``env -i``, ``LC_ALL=C`` or a missing
  locale). Given a config path it reads nothing from /etc/orthanc; ``"Plugins": []``
  keeps Debian's plugin folder out. No Debian service runs here (4242 and 8042 free),
  and we use free ports anyway.
- A port taken meanwhile: Orthanc logs "The TCP port of the DICOM (or HTTP) server is
  privileged or already in use" and exits with 255 about 0.5 s later. ``start_orthanc``
  retries on new ports.
- urllib honours ``http_proxy``: REST calls go through an opener without proxies.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .dcmtk import dcmtk_env, find_orthanc, missing
from .net import free_port, wait_for_port
from .procs import Proc, Procs

LOCALHOST = "127.0.0.1"

#: How long Orthanc may take to listen on both ports and answer REST before the test fails.
ORTHANC_START_TIMEOUT = 30.0

#: Timeout of every REST call, in seconds.
HTTP_TIMEOUT = 10.0

_NO_MODALITIES: Mapping[str, tuple[str, str, int]] = MappingProxyType({})

# urllib honours http_proxy/HTTP_PROXY: an opener with no proxies always goes straight
# to 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class OrthancError(RuntimeError):
    """A REST call failed: an HTTP error status, or no answer within the timeout."""


@dataclass(frozen=True, slots=True)
class Orthanc:
    """A running Orthanc on 127.0.0.1 (see ``start_orthanc``) and its REST API."""

    aet: str
    host: str
    dicom_port: int
    http_port: int
    proc: Proc
    workdir: Path
    config_path: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    # -- REST ------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        content_type: str = "application/octet-stream",
        timeout: float = HTTP_TIMEOUT,
    ) -> bytes:
        """``method path`` on the REST API; the response body. Raises ``OrthancError``."""
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        try:
            with _OPENER.open(req, timeout=timeout) as resp:
                data: bytes = resp.read()
                return data
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")
            raise OrthancError(f"{method} {path}: HTTP {e.code}\n{detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise OrthancError(f"{method} {path}: {e}\n{self.proc.log()}") from None

    def get_json(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def post_json(self, path: str, payload: Any) -> Any:
        """POST ``payload`` (bytes as they are, anything else as JSON); the decoded answer."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return json.loads(self.request("POST", path, body, content_type="application/json"))

    def system(self) -> dict[str, Any]:
        """``GET /system``: version, AE title, ports."""
        result: dict[str, Any] = self.get_json("/system")
        return result

    def statistics(self) -> dict[str, Any]:
        """``GET /statistics``: ``CountInstances``, ``TotalDiskSize``..."""
        result: dict[str, Any] = self.get_json("/statistics")
        return result

    def instances(self) -> list[str]:
        """Orthanc IDs of all stored instances (``GET /instances``)."""
        result: list[str] = self.get_json("/instances")
        return result

    def instance_file(self, orthanc_id: str) -> bytes:
        """The stored Part 10 file (``GET /instances/{id}/file``); see the module docstring."""
        return self.request("GET", f"/instances/{_quote(orthanc_id)}/file")

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        """``GET /instances/{id}/simplified-tags``: keyword -> str, list or dict."""
        result: dict[str, Any] = self.get_json(f"/instances/{_quote(orthanc_id)}/simplified-tags")
        return result

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """Orthanc ID of the instance with this SOP Instance UID, or None (``/tools/lookup``)."""
        for item in self.post_json("/tools/lookup", sop_instance_uid.encode("ascii")):
            if item.get("Type") == "Instance":
                return str(item["ID"])
        return None

    def sop_instance_uids(self) -> set[str]:
        """SOP Instance UIDs of all stored instances (one ``/tools/find`` call)."""
        found = self.post_json("/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})
        return {item["MainDicomTags"]["SOPInstanceUID"] for item in found}

    def upload(self, data: bytes | str | os.PathLike[str]) -> dict[str, Any]:
        """Store a Part 10 file through REST (``POST /instances``): ``{"ID", "Status"...}``.

        ``Status`` is ``"Success"`` or ``"AlreadyStored"``; a file Orthanc refuses raises
        ``OrthancError`` (HTTP 400 or 404). The file is kept byte for byte.
        """
        body = data if isinstance(data, bytes) else Path(data).read_bytes()
        result: dict[str, Any] = json.loads(
            self.request("POST", "/instances", body, content_type="application/dicom")
        )
        return result

    def delete_all(self) -> None:
        """Delete every patient, hence every study, series and instance."""
        for patient in self.get_json("/patients"):
            self.request("DELETE", f"/patients/{_quote(patient)}")

    # -- process ---------------------------------------------------------------------------

    def kill(self) -> int:
        """Stop Orthanc at once (SIGKILL to its process group); returns the exit code.

        A graceful stop takes 3.5 s (see the module docstring) and the storage is thrown
        away with the test's tmp dir anyway.
        """
        if self.proc.running:
            self.proc.signal(signal.SIGKILL)
        return self.proc.wait(10)


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def orthanc_config(
    workdir: Path,
    *,
    aet: str,
    dicom_port: int,
    http_port: int,
    modalities: Mapping[str, tuple[str, str, int]] = _NO_MODALITIES,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The configuration ``start_orthanc`` writes; ``overrides`` replace keys last."""
    if not 1 <= len(aet) <= 16:
        raise ValueError(f"AE title must have 1 to 16 characters: {aet!r}")
    config: dict[str, Any] = {
        "Name": f"test-{aet}",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "StorageCompression": False,
        "Plugins": [],
        "LuaScripts": [],
        "ConcurrentJobs": 1,
        "SaveJobs": False,
        "SyncStorageArea": False,  # no fsync per instance: the storage is thrown away
        # HTTP: binds 0.0.0.0 (no option), answers 401 to clients not on the loopback.
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpCompressionEnabled": False,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "HttpRequestTimeout": 10,
        "HttpThreadsCount": 4,
        # DICOM: binds 0.0.0.0 (no option); any calling AE may echo, store, find, get
        # and move. C-MOVE destinations must be in DicomModalities.
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True,
        "DicomCheckModalityHost": False,
        "UnknownSopClassAccepted": True,
        "OverwriteInstances": True,
        "DicomScpTimeout": 5,  # an idle incoming association is aborted after this
        "DicomScuTimeout": 5,
        "DicomAssociationCloseDelay": 0,  # release its own associations once done
        "SynchronousCMove": True,
        "DicomModalities": {
            name: [m_aet, host, int(port)] for name, (m_aet, host, port) in modalities.items()
        },
    }
    config.update(overrides or {})
    return config


def start_orthanc(
    procs: Procs,
    workdir: Path,
    *,
    aet: str = "ORTHANC",
    modalities: Mapping[str, tuple[str, str, int]] = _NO_MODALITIES,
    config: Mapping[str, Any] | None = None,
    args: Sequence[str] = (),
    binary: str | None = None,
    attempts: int = 3,
) -> Orthanc:
    """Start Orthanc as AE ``aet``, with config, storage and index under ``workdir``.

    DICOM and HTTP ports are free ones. ``modalities`` maps a name to the (AE title, host,
    port) of a peer Orthanc may C-STORE to and C-MOVE to (``DicomModalities``). ``config``
    replaces keys of ``orthanc_config`` (e.g. ``{"UnknownSopClassAccepted": False}``);
    ``args`` go before the config path (e.g. ``["--verbose"]``, ``["--trace-dicom"]``).
    ``binary`` defaults to ``find_orthanc()`` (skip, or fail under CI, if missing).

    Returns once both ports listen and ``GET /system`` answers with our AE title and
    ports, within ``ORTHANC_START_TIMEOUT`` seconds. A port taken meanwhile by another
    process is retried on new ports, ``attempts`` times in all. Otherwise raises
    ``RuntimeError`` with Orthanc's log. ``procs`` stops it at teardown; ``kill()`` is
    quicker.
    """
    exe = binary or find_orthanc()
    if exe is None:
        missing("Orthanc")
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "orthanc.json"
    for attempt in range(1, attempts + 1):
        dicom_port, http_port = free_port(), free_port()
        while http_port == dicom_port:
            http_port = free_port()
        settings = orthanc_config(
            workdir, aet=aet, dicom_port=dicom_port, http_port=http_port,
            modalities=modalities, overrides=config,
        )
        config_path.write_text(json.dumps(settings, indent=2))
        proc = procs.start([exe, *args, str(config_path)], name="orthanc", env=dcmtk_env(),
                           cwd=workdir)
        server = Orthanc(aet, LOCALHOST, dicom_port, http_port, proc, workdir, config_path)
        try:
            _wait_ready(server)
        except _PortTaken:
            if attempt == attempts:
                raise RuntimeError(f"Orthanc did not start:\n{proc.log()}") from None
            continue
        return server
    raise AssertionError("unreachable")


class _PortTaken(Exception):
    """Orthanc exited because one of its ports was in use: worth another try."""


def _wait_ready(server: Orthanc) -> None:
    """Wait until ``server`` listens on both ports and its REST API says it is ours."""
    proc = server.proc
    deadline = time.monotonic() + ORTHANC_START_TIMEOUT
    # Orthanc opens the DICOM port, then the HTTP port, then logs "Orthanc has started".
    # The probe connection to the DICOM port is dropped without a word in its log. Our
    # Orthanc answers /system in milliseconds: a short timeout there keeps a foreign
    # server that took the HTTP port (and says nothing) from costing HTTP_TIMEOUT.
    try:
        for port in (server.dicom_port, server.http_port):
            wait_for_port(LOCALHOST, port, max(0.1, deadline - time.monotonic()), proc=proc)
        system = json.loads(server.request("GET", "/system", timeout=2.0))
    except (RuntimeError, TimeoutError, OrthancError, ValueError) as e:
        if _exited_port_in_use(proc):
            raise _PortTaken from None
        proc.stop()
        raise RuntimeError(f"Orthanc did not start ({e}):\n{proc.log()}") from None
    mine = (system.get("DicomAet"), system.get("DicomPort"), system.get("HttpPort"))
    if mine != (server.aet, server.dicom_port, server.http_port):
        # Another server answered on "our" HTTP port: Orthanc itself is on its way out.
        if _exited_port_in_use(proc):
            raise _PortTaken
        proc.stop()
        raise RuntimeError(
            f"not our Orthanc on port {server.http_port}: {system}\n{proc.log()}"
        )


def _exited_port_in_use(proc: Proc) -> bool:
    # Orthanc exits about 0.5 s after failing to bind, having logged "... already in use".
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        return False
    return "already in use" in proc.log()
