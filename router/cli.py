"""``dicom-router``: the router and its operator commands.

Exit codes (for scripts): 0 success; 1 the peer answered with a failure or
warning status (some instances not stored, ...); 2 usage or configuration
error; 3 could not associate (connection refused, rejected, aborted).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from router.dicom import dimse, uids
from router.dicom.dataset import read_part10_header
from router.dicom.errors import ProtocolError
from router.dicom.negotiation import AcceptorPolicy
from router.net.client import (
    AssociationAbortedError,
    AssociationRejectedError,
    ClientAssociation,
    NetworkError,
    connect,
)
from router.net.server import Handlers, Request, Server, iter_instances

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NETWORK = 0, 1, 2, 3

log = logging.getLogger("dicom-router")

_MODELS = {
    ("patient", "find"): uids.PATIENT_ROOT_QR_FIND,
    ("study", "find"): uids.STUDY_ROOT_QR_FIND,
    ("worklist", "find"): uids.MODALITY_WORKLIST_INFORMATION_FIND,
    ("patient", "move"): uids.PATIENT_ROOT_QR_MOVE,
    ("study", "move"): uids.STUDY_ROOT_QR_MOVE,
    ("patient", "get"): uids.PATIENT_ROOT_QR_GET,
    ("study", "get"): uids.STUDY_ROOT_QR_GET,
}


class UsageError(Exception):
    """A bad argument: printed as one line, exit code 2."""


# ---------------------------------------------------------------- arguments


def _add_association_args(p: argparse.ArgumentParser, *, default_aec: str = "ANY-SCP") -> None:
    p.add_argument("host", help="peer host name or address")
    p.add_argument("port", type=int, help="peer TCP port")
    p.add_argument("-aet", "--calling-aet", default="DICOM-ROUTER", metavar="AE",
                   help="our (calling) AE title (default: %(default)s)")
    p.add_argument("-aec", "--called-aet", default=default_aec, metavar="AE",
                   help="peer (called) AE title (default: %(default)s)")
    p.add_argument("--max-pdu", type=int, default=1 << 20, metavar="BYTES",
                   help="largest PDU we accept (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="association and DIMSE timeout in seconds (default: %(default)s)")


def _add_query_args(p: argparse.ArgumentParser, default_level: str) -> None:
    p.add_argument("-k", "--key", action="append", default=[], metavar="KEY=VALUE",
                   help="query key by keyword or tag, e.g. PatientID=123 or 0010,0020=123; "
                        "KEY alone asks for the attribute to be returned (repeatable)")
    p.add_argument("-L", "--level", default=default_level,
                   choices=["PATIENT", "STUDY", "SERIES", "IMAGE"],
                   help="QueryRetrieveLevel (default: %(default)s)")
    model = p.add_mutually_exclusive_group()
    model.add_argument("-P", "--patient", dest="model", action="store_const", const="patient",
                       help="Patient Root information model")
    model.add_argument("-S", "--study", dest="model", action="store_const", const="study",
                       help="Study Root information model (default)")
    p.set_defaults(model="study")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-router",
        description="DICOM router and operator tools. Exit codes: 0 ok, 1 DICOM failure "
                    "status, 2 usage error, 3 association failed.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the receiver (C-ECHO/C-STORE SCP)",
                         description="Run a C-ECHO/C-STORE SCP that prints one line per "
                                     "association and per instance received. The "
                                     "multiprocess router with rules replaces it later.")
    run.add_argument("--host", default="0.0.0.0",
                     help="address to listen on (default: %(default)s)")
    run.add_argument("--port", type=int, default=11112, help="TCP port (default: %(default)s)")
    run.add_argument("--ae-title", default="DICOM-ROUTER",
                     help="our AE title (default: %(default)s)")
    run.add_argument("--output", type=Path, default=None, metavar="DIR",
                     help="also write each received instance as a Part 10 file into DIR")

    echo = sub.add_parser("echo", help="C-ECHO a peer (verification)")
    _add_association_args(echo)
    echo.add_argument("-r", "--repeat", type=int, default=1, help="number of C-ECHOs")

    send = sub.add_parser("send", help="C-STORE files or folders to a peer")
    _add_association_args(send)
    send.add_argument("paths", nargs="+", metavar="FILE|DIR", help="files or folders (recursive)")
    send.add_argument("--no-progress", action="store_true", help="no progress bar")

    find = sub.add_parser("find", help="C-FIND query")
    _add_association_args(find)
    _add_query_args(find, "STUDY")
    find.add_argument("-W", "--worklist", dest="model", action="store_const", const="worklist",
                      help="Modality Worklist information model")

    move = sub.add_parser("move", help="C-MOVE: ask a peer to send instances to an AE")
    _add_association_args(move)
    _add_query_args(move, "STUDY")
    move.add_argument("--dest", "-aem", required=True, metavar="AE",
                      help="move destination AE title")

    get = sub.add_parser("get", help="C-GET: retrieve instances on this association")
    _add_association_args(get)
    _add_query_args(get, "STUDY")
    get.add_argument("--out", "-od", type=Path, default=Path("."), metavar="DIR",
                     help="folder for received files (default: current folder)")
    return parser


def _query(keys: Sequence[str], level: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for item in keys:
        key, _, value = item.partition("=")
        key = key.strip()
        if "," in key:
            group, _, elem = key.partition(",")
            try:
                tag = (int(group, 16) << 16) | int(elem, 16)
            except ValueError:
                raise UsageError(f"bad tag {key!r}: expected gggg,eeee in hex") from None
            from pydicom.datadict import dictionary_VR, keyword_for_tag
            keyword = keyword_for_tag(tag)
            if not keyword:
                raise UsageError(f"unknown tag {key!r}")
            vr = dictionary_VR(tag)
            ds.add_new(tag, vr, value or None)
            continue
        if tag_for_keyword(key) is None:
            raise UsageError(f"unknown attribute keyword {key!r}")
        setattr(ds, key, value)
    return ds


# --------------------------------------------------------------- commands


def _open(args: argparse.Namespace, contexts: Sequence[tuple[str, Sequence[str]]],
          **kwargs: object) -> ClientAssociation:
    return connect(args.host, args.port, calling_ae=args.calling_aet, called_ae=args.called_aet,
                   contexts=contexts, max_pdu=args.max_pdu, acse_timeout=args.timeout,
                   dimse_timeout=args.timeout, **kwargs)  # type: ignore[arg-type]


def cmd_echo(args: argparse.Namespace) -> int:
    ts = (uids.EXPLICIT_VR_LITTLE_ENDIAN, uids.IMPLICIT_VR_LITTLE_ENDIAN)
    with _open(args, [(uids.VERIFICATION_SOP_CLASS, ts)]) as assoc:
        for _ in range(args.repeat):
            status = assoc.echo()
            print(f"C-ECHO {args.called_aet}@{args.host}:{args.port}: status 0x{status:04X}")
            if status != dimse.SUCCESS:
                return EXIT_FAILED
    return EXIT_OK


def cmd_send(args: argparse.Namespace) -> int:
    files = list(iter_instances(args.paths))
    headers = []
    skipped = 0
    for path in files:
        try:
            headers.append((path, read_part10_header(path)))
        except (ProtocolError, OSError) as exc:
            skipped += 1
            print(f"skipping {path}: {exc}", file=sys.stderr)
    if not headers:
        raise UsageError("no DICOM files to send")
    proposals: dict[str, list[str]] = {}
    for _, h in headers:
        ts_list = proposals.setdefault(h.sop_class_uid, [])
        for ts in (h.transfer_syntax, uids.EXPLICIT_VR_LITTLE_ENDIAN,
                   uids.IMPLICIT_VR_LITTLE_ENDIAN):
            if ts not in ts_list and (ts == h.transfer_syntax or uids.is_uncompressed(
                    h.transfer_syntax)):
                ts_list.append(ts)
    # One context per (SOP class, TS) keeps acceptors that pick one TS per
    # context from refusing files in the other syntaxes (storescu does the same).
    contexts = [(sop, [ts]) for sop, tss in proposals.items() for ts in tss]
    if len(contexts) > 128:
        raise UsageError(f"{len(contexts)} presentation contexts needed, at most 128 fit "
                         "in one association; send fewer SOP classes at once")
    ok = failed = warned = 0
    total_bytes = 0
    started = time.monotonic()
    progress = sys.stderr.isatty() and not args.no_progress
    with _open(args, contexts) as assoc:
        for n, (path, _header) in enumerate(headers, 1):
            try:
                rsp = assoc.store(path)
                status = int(rsp.status)
            except ProtocolError as exc:
                if isinstance(exc, NetworkError):
                    raise
                print(f"{path}: {exc}", file=sys.stderr)
                failed += 1
                continue
            total_bytes += path.stat().st_size
            category = dimse.status_category(status)
            if category is dimse.StatusCategory.SUCCESS:
                ok += 1
            elif category is dimse.StatusCategory.WARNING:
                warned += 1
            else:
                failed += 1
                print(f"{path}: C-STORE status 0x{status:04X}", file=sys.stderr)
            if progress:
                _progress(n, len(headers), total_bytes, time.monotonic() - started)
    if progress:
        print(file=sys.stderr)
    took = time.monotonic() - started
    print(f"sent {ok} ok, {warned} warning, {failed} failed, {skipped} skipped; "
          f"{total_bytes / 1e6:.1f} MB in {took:.2f} s "
          f"({len(headers) / took if took else 0:.0f} instances/s)")
    return EXIT_OK if failed == 0 and skipped == 0 else EXIT_FAILED


def _progress(done: int, total: int, nbytes: int, elapsed: float) -> None:
    width = 30
    filled = int(width * done / total)
    rate = nbytes / elapsed / 1e6 if elapsed else 0.0
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
                     f"{rate:.1f} MB/s")
    sys.stderr.flush()


def cmd_find(args: argparse.Namespace) -> int:
    model = _MODELS[(args.model, "find")]
    query = _query(args.key, args.level)
    if args.model == "worklist":
        del query.QueryRetrieveLevel
    ts = (uids.EXPLICIT_VR_LITTLE_ENDIAN, uids.IMPLICIT_VR_LITTLE_ENDIAN)
    status = dimse.SUCCESS
    with _open(args, [(model, ts)]) as assoc:
        n = 0
        for result_status, identifier in assoc.find(query, model=model):
            status = result_status
            if identifier is not None:
                n += 1
                print(f"# result {n}")
                print(identifier)
        print(f"C-FIND: {n} results, final status 0x{status:04X}")
    return EXIT_OK if status == dimse.SUCCESS else EXIT_FAILED


def cmd_move(args: argparse.Namespace) -> int:
    model = _MODELS[(args.model, "move")]
    ts = (uids.EXPLICIT_VR_LITTLE_ENDIAN, uids.IMPLICIT_VR_LITTLE_ENDIAN)
    last = None
    with _open(args, [(model, ts)]) as assoc:
        for rsp in assoc.move(_query(args.key, args.level), args.dest, model=model):
            last = rsp
            print(f"C-MOVE status 0x{rsp.status:04X} remaining "
                  f"{rsp.number_of_remaining_sub_operations} completed "
                  f"{rsp.number_of_completed_sub_operations} failed "
                  f"{rsp.number_of_failed_sub_operations} warning "
                  f"{rsp.number_of_warning_sub_operations}")
    return EXIT_OK if last is not None and last.status == dimse.SUCCESS else EXIT_FAILED


def cmd_get(args: argparse.Namespace) -> int:
    from router.dicom.dataset import part10_meta_bytes

    model = _MODELS[(args.model, "get")]
    ts = (uids.EXPLICIT_VR_LITTLE_ENDIAN, uids.IMPLICIT_VR_LITTLE_ENDIAN)
    storage_ts = [uids.EXPLICIT_VR_LITTLE_ENDIAN, uids.IMPLICIT_VR_LITTLE_ENDIAN]
    # Storage classes for the sub-operations, with us as SCP (PS3.4 C.4.3).
    # 127 contexts at most besides the query model: common classes first.
    storage = list(uids.storage_sop_classes())[:127]
    contexts: list[tuple[str, Sequence[str]]] = [(model, ts)]
    contexts += [(sop, storage_ts) for sop in storage]
    roles = {sop: (False, True) for sop in storage}
    args.out.mkdir(parents=True, exist_ok=True)
    received = 0

    def on_store(rq: dimse.CStoreRQ, data: bytes, transfer_syntax: str) -> int:
        nonlocal received
        path = args.out / f"{rq.affected_sop_instance_uid}.dcm"
        tmp = path.with_suffix(".part")
        tmp.write_bytes(part10_meta_bytes(
            sop_class_uid=rq.affected_sop_class_uid,
            sop_instance_uid=rq.affected_sop_instance_uid,
            transfer_syntax=transfer_syntax, source_ae_title=args.called_aet) + data)
        os.replace(tmp, path)
        received += 1
        return dimse.SUCCESS

    last = None
    with _open(args, contexts, roles=roles, on_store=on_store) as assoc:
        for rsp in assoc.get(_query(args.key, args.level), model=model):
            last = rsp
    print(f"C-GET: {received} instances received into {args.out}, final status "
          f"0x{last.status if last else 0xFFFF:04X}")
    return EXIT_OK if last is not None and last.status == dimse.SUCCESS else EXIT_FAILED


def cmd_run(args: argparse.Namespace) -> int:
    from router.dicom.dataset import part10_meta_bytes

    out: Path | None = args.output
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    def on_store(req: Request) -> int:
        msg = req.message
        data = req.dataset_bytes or b""
        print(f"{req.assoc} C-STORE {msg.affected_sop_class_uid} "
              f"{msg.affected_sop_instance_uid} {len(data)} bytes", flush=True)
        if out is not None:
            path = out / f"{req.assoc.id}-{msg.message_id}.dcm"  # never from dataset content
            path.write_bytes(part10_meta_bytes(
                sop_class_uid=msg.affected_sop_class_uid,
                sop_instance_uid=msg.affected_sop_instance_uid,
                transfer_syntax=req.context.transfer_syntax,
                source_ae_title=req.assoc.calling_ae) + data)
        return dimse.SUCCESS

    def on_echo(req: Request) -> int:
        print(f"{req.assoc} C-ECHO", flush=True)
        return dimse.SUCCESS

    policy = AcceptorPolicy(
        abstract_syntaxes={uids.VERIFICATION_SOP_CLASS: None,
                           **dict.fromkeys(uids.storage_sop_classes())})
    handlers = Handlers(on_c_echo=on_echo, on_c_store=on_store)
    try:
        server = Server(handlers, ae_title=args.ae_title, host=args.host, port=args.port,
                        policy=policy)
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    print(f"dicom-router: embedded default config: C-ECHO/C-STORE SCP {args.ae_title} on "
          f"{server.host}:{server.port}" + (f", writing to {out}" if out else ""), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    stop.wait()
    server.shutdown()
    return EXIT_OK


COMMANDS = {"run": cmd_run, "echo": cmd_echo, "send": cmd_send, "find": cmd_find,
            "move": cmd_move, "get": cmd_get}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    if args.command == "run":
        level = min(level, logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"dicom-router {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except AssociationRejectedError as exc:
        print(f"dicom-router {args.command}: {exc}", file=sys.stderr)
        return EXIT_NETWORK
    except (AssociationAbortedError, NetworkError, OSError) as exc:
        print(f"dicom-router {args.command}: {args.host}:{args.port}: {exc}", file=sys.stderr)
        return EXIT_NETWORK
    except ProtocolError as exc:
        print(f"dicom-router {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
