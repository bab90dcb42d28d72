"""``dicom-router`` commands (router.cli): regressions for ``run --output`` (durable,
collision-free files) and ``get`` (what it proposes). In-process: our Server and
client on 127.0.0.1, no subprocess, no sleep."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid

import router.cli as cli
from router.dicom import uids
from router.dicom.dataset import read_part10_header
from router.dicom.negotiation import AcceptorPolicy
from router.net.client import connect
from router.net.server import CancelToken, Handlers, Request, Server
from tests.helpers import make_ct, pydicom_test_files
from tests.net.test_server import ELE, IO_TIMEOUT, serve

__all__ = ["serve"]  # the fixture, imported for the tests below

CT = "1.2.840.10008.5.1.4.1.1.2"
PET = "1.2.840.10008.5.1.4.1.1.128"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"
PDF = "1.2.840.10008.5.1.4.1.1.104.1"
RT_PLAN = "1.2.840.10008.5.1.4.1.1.481.5"
NAME = re.compile(r"[0-9a-f]{32}\.dcm")


# ---------------------------------------------------------------------------
# Finding 1: run --output
# ---------------------------------------------------------------------------


@pytest.fixture
def run_server(tmp_path: Path) -> Iterator[Callable[[], Server]]:
    """``dicom-router run --output tmp_path/out``'s handlers in a Server; each call is
    a fresh server (a restart), all shut down at teardown."""
    servers: list[Server] = []
    out = tmp_path / "out"
    out.mkdir()

    def start() -> Server:
        server = Server(cli.run_handlers(out), ae_title="ROUTER", host="127.0.0.1", port=0,
                        policy=AcceptorPolicy()).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()


def store(port: int, *instances: Dataset) -> list[int]:
    with connect("127.0.0.1", port, calling_ae="MODALITY", called_ae="ROUTER",
                 contexts=[(CT, [ELE])], acse_timeout=IO_TIMEOUT,
                 dimse_timeout=IO_TIMEOUT) as assoc:
        return [int(assoc.store(ds).status) for ds in instances]


def test_run_output_never_overwrites_across_restarts(
        run_server: Callable[[], Server], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs, each receiving message ID 1 on its first association: two files,
    named by uuid4 (never by association/message ID or data set content), each
    fsynced, linked into place and its folder fsynced before Success."""
    out = tmp_path / "out"
    steps: list[str] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        steps.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        real_fsync(fd)

    def link(src: Any, dst: Any, **kwargs: Any) -> None:
        steps.append("link")
        assert Path(src).name.endswith(".part") and NAME.fullmatch(Path(dst).name)
        real_link(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    first, second = make_ct(size_kb=8), make_ct(size_kb=8)
    assert store(run_server().port, first) == [0]
    assert store(run_server().port, second) == [0]  # a restart: IDs start again
    assert steps == ["fsync-file", "link", "fsync-dir"] * 2
    files = sorted(out.iterdir())
    assert len(files) == 2 and all(NAME.fullmatch(p.name) for p in files)
    got = {str(pydicom.dcmread(p).SOPInstanceUID) for p in files}
    assert got == {first.SOPInstanceUID, second.SOPInstanceUID}
    header = read_part10_header(files[0])
    assert header.transfer_syntax == ELE


@pytest.mark.parametrize(("code", "status"), [(errno.ENOSPC, 0xA700), (errno.EDQUOT, 0xA700),
                                              (errno.EIO, 0x0110)])
def test_run_output_failure_is_not_acknowledged_and_leaves_nothing(
        run_server: Callable[[], Server], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        code: int, status: int) -> None:
    def fsync(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fsync)
    assert store(run_server().port, make_ct(size_kb=8)) == [status]
    assert list((tmp_path / "out").iterdir()) == []


def test_run_output_write_failure_removes_the_temporary_file(
        run_server: Callable[[], Server], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = cli.ReceivedFile.write
    calls = 0

    def write(self: cli.ReceivedFile, data: memoryview) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, data)

    monkeypatch.setattr(cli.ReceivedFile, "write", write)
    port = run_server().port
    with connect("127.0.0.1", port, calling_ae="MODALITY", called_ae="ROUTER",
                 contexts=[(CT, [ELE])], acse_timeout=IO_TIMEOUT,
                 dimse_timeout=IO_TIMEOUT) as assoc:
        assert assoc.store(make_ct(size_kb=64)).status == 0xA700
        assert assoc.store(make_ct(size_kb=8)).status == 0  # next one is fine
    [kept] = list((tmp_path / "out").iterdir())
    assert NAME.fullmatch(kept.name)


# ---------------------------------------------------------------------------
# Finding 14: what `get` proposes
# ---------------------------------------------------------------------------


def test_get_contexts_cover_common_classes_within_the_limit() -> None:
    contexts, roles = cli.get_contexts(uids.STUDY_ROOT_QR_GET)
    assert len(contexts) <= 128
    assert contexts[0] == (uids.STUDY_ROOT_QR_GET, [ELE, uids.IMPLICIT_VR_LITTLE_ENDIAN])
    by_class: dict[str, list[list[str]]] = {}
    for sop, syntaxes in contexts[1:]:
        by_class.setdefault(sop, []).append(list(syntaxes))
    for sop in by_class:
        assert "Storage" in UID(sop).name, sop
    uncompressed = [ELE, uids.IMPLICIT_VR_LITTLE_ENDIAN]
    for sop in (CT, PET, KOS, PDF, RT_PLAN, "1.2.840.10008.5.1.4.1.1.481.2",
                "1.2.840.10008.5.1.4.1.1.481.3", "1.2.840.10008.5.1.4.1.1.66.4",
                "1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.88.22",
                "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.67",
                "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.4.1",
                "1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.6.1"):
        assert uncompressed in by_class[sop], UID(sop).name
        assert roles[sop] == (False, True)
    for sop in (CT, "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.1",
                "1.2.840.10008.5.1.4.1.1.1.2", PET, "1.2.840.10008.5.1.4.1.1.7"):
        assert [cli.JPEG_LOSSLESS_SV1] in by_class[sop], UID(sop).name
        assert [cli.JPEG_2000_LOSSLESS, cli.JPEG_2000] in by_class[sop], UID(sop).name
    assert len(by_class) >= 60


def late_class(sop_class: str, **attrs: Any) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = "CLI"
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def test_cli_get_receives_compressed_and_later_classes(
        serve: Callable[..., Server], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """PET, KOS, PDF and RT Plan (cut by the old first-127-by-UID list) and a JPEG
    2000 lossless MR (never proposed before) all arrive, as they are."""
    by_name = {p.name: p for p in pydicom_test_files()}
    files = [by_name["MR_small_jp2klossless.dcm"], by_name["rtplan.dcm"]]
    datasets = [late_class(PET, Modality="PT"), late_class(KOS),
                late_class(PDF, MIMETypeOfEncapsulatedDocument="application/pdf",
                           EncapsulatedDocument=b"%PDF-1.4 test\n")]

    def on_c_get(req: Request, token: CancelToken) -> list[Any]:
        return [*files, *datasets]

    server = serve(Handlers(on_c_get=on_c_get))
    out = tmp_path / "got"
    code = cli.main(["get", "127.0.0.1", str(server.port), "-aec", "NETSCP", "--out", str(out),
                     "--timeout", str(IO_TIMEOUT), "-k", "StudyInstanceUID=1.2.3"])
    printed = capsys.readouterr().out
    assert code == cli.EXIT_OK, printed
    assert f"C-GET: 5 instances received into {out}, final status 0x0000" in printed
    got = {read_part10_header(p).sop_instance_uid: read_part10_header(p)
           for p in out.iterdir()}
    mr = read_part10_header(files[0])
    assert got[mr.sop_instance_uid].transfer_syntax == mr.transfer_syntax  # still J2K
    expected = {read_part10_header(files[1]).sop_instance_uid: RT_PLAN,
                **{str(ds.SOPInstanceUID): str(ds.SOPClassUID) for ds in datasets}}
    for uid, sop_class in expected.items():
        assert got[uid].sop_class_uid == sop_class


@pytest.mark.parametrize(("key", "said"), [
    ("Rows=abc", "dicom-router find: -k Rows=abc: not a value for it: "),
    ("=1", "dicom-router find: -k =1: no attribute before the '='"),
    ("Nonsense=1", "dicom-router find: unknown attribute keyword 'Nonsense'"),
])
def test_a_query_key_that_cannot_be_is_a_usage_error_in_one_line(
        key: str, said: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`-k Rows=abc` printed pydicom's warnings and a traceback (exit 1); `-k =1`
    was taken for some tag. Both are usage errors now: one line, exit 2, before any
    association is tried (port 9 would refuse it)."""
    assert cli.main(["find", "127.0.0.1", "9", "-k", key]) == 2
    err = capsys.readouterr().err
    assert err.startswith(said) and err.count("\n") == 1, err


def test_query_keys_a_query_may_hold_still_go_through() -> None:
    """Ranges and wildcards are query values (PS3.4 C.2.2.2), not value errors."""
    ds = cli._query(["StudyDate=20240101-20240131", "PatientName=Doe*", "0008,0061",
                     "0020,000D=1.2.3", "AccessionNumber"], "STUDY")
    assert ds.StudyDate == "20240101-20240131" and ds.StudyInstanceUID == "1.2.3"


@pytest.mark.parametrize("size", ["0", "1000", "16777217", "lots"])
def test_max_pdu_out_of_range_is_a_usage_error(size: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A PDU is held whole as it arrives: --max-pdu 0 (no limit) let a server send a
    whole instance as one PDU. 4096 to 16 MiB, like the configuration's max_pdu."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["echo", "127.0.0.1", "9", "--max-pdu", size])
    assert exited.value.code == 2
    assert "argument --max-pdu: " in capsys.readouterr().err


def test_cli_get_names_no_file_after_a_uid_that_is_not_one(
        serve: Callable[..., Server], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The server names the files: Affected SOP Instance UIDs "..", "." and "1..2" made
    hidden files ("...dcm", "..dcm") or odd ones. Such instances are kept as
    unnamed-N.dcm; a real UID still names its file."""
    datasets = [late_class(KOS, SOPInstanceUID=uid) for uid in ("..", ".", "1..2")]
    good = late_class(KOS)

    def on_c_get(req: Request, token: CancelToken) -> list[Any]:
        return [*datasets, good]

    server = serve(Handlers(on_c_get=on_c_get))
    out = tmp_path / "got"
    code = cli.main(["get", "127.0.0.1", str(server.port), "-aec", "NETSCP", "--out", str(out),
                     "--timeout", str(IO_TIMEOUT), "-k", "StudyInstanceUID=1.2.3"])
    assert code == cli.EXIT_OK, capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        f"{good.SOPInstanceUID}.dcm", "unnamed-1.dcm", "unnamed-2.dcm", "unnamed-3.dcm"]
    assert [read_part10_header(out / f"unnamed-{n}.dcm").sop_instance_uid
            for n in (1, 2, 3)] == ["..", ".", "1..2"]


@pytest.mark.parametrize("argv", [
    ["status", "--timeout", "0"], ["reload", "--timeout", "-1"],
    ["echo", "127.0.0.1", "9", "--timeout", "nan"], ["queue", "retry", "--timeout", "inf"],
    ["rules", "test", "r.toml", "x.dcm", "--calling-ae", "X", "--peer", "banana"],
    ["rules", "test", "r.toml", "x.dcm", "--calling-ae", "X", "--peer", "10.0.0.999"],
])
def test_values_that_cannot_be_are_usage_errors(argv: list[str],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`status --timeout -1` waited "within -1 s"; `rules test --peer banana` said the
    peer was "not in 10.0.0.0/8" (an outside campaign)."""
    with pytest.raises(SystemExit) as ended:
        cli.main(argv)
    assert ended.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument --" in err and "Traceback" not in err, err
