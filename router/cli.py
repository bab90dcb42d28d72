"""``dicom-router``: the router and its operator commands.

Exit codes (for scripts): 0 success; 1 the peer answered with a failure or
warning status (some instances not stored, ...); 2 usage or configuration
error; 3 could not associate (connection refused, rejected, aborted).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any, Final

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from router import logline
from router.config import (
    MAX_PDU,
    MIN_PDU,
    Config,
    ConfigError,
    ae_title_problem,
    load_config,
    max_pdu_problem,
)
from router.dicom import dimse, uids
from router.dicom.dataset import Part10, encode_dataset, part10_meta_bytes, read_part10_header
from router.dicom.errors import ProtocolError
from router.dicom.negotiation import MAX_PRESENTATION_CONTEXTS, AcceptorPolicy
from router.net.client import (
    AssociationAbortedError,
    AssociationRejectedError,
    ClientAssociation,
    NetworkError,
    connect,
)
from router.net.server import Handlers, Request, Server, StoreSink, iter_instances

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


class ConfigUsageError(UsageError):
    """A configuration error, already one line naming the file and the key."""


class RouterNotRunning(Exception):
    """The admin socket did not answer: exit code 3."""


# ---------------------------------------------------------------- arguments


# The association flags' defaults (see _add_association_args).
_DEFAULTS: Final[dict[str, Any]] = {"calling_aet": "DICOM-ROUTER", "called_aet": "ANY-SCP",
                                    "max_pdu": 1 << 20, "timeout": 30.0}


def _add_association_args(p: argparse.ArgumentParser, *,
                          default_aec: str = _DEFAULTS["called_aet"],
                          peer_optional: bool = False) -> None:
    # With peer_optional (echo --destination), the flags default to None there: a
    # flag given overrides the destination's setting, one not given leaves it.
    more = {"nargs": "?", "default": None} if peer_optional else {}
    p.add_argument("host", help="peer host name or address", **more)  # type: ignore[arg-type]
    p.add_argument("port", type=int, help="peer TCP port", **more)  # type: ignore[arg-type]
    p.add_argument("-aet", "--calling-aet", metavar="AE",
                   help=f"our (calling) AE title (default: {_DEFAULTS['calling_aet']})")
    p.add_argument("-aec", "--called-aet", metavar="AE",
                   help=f"peer (called) AE title (default: {default_aec})")
    p.add_argument("--max-pdu", type=_max_pdu, metavar="BYTES",
                   help=f"largest PDU we accept, {MIN_PDU} to {MAX_PDU} (default: "
                        f"{_DEFAULTS['max_pdu']})")
    p.add_argument("--timeout", type=seconds, metavar="S",
                   help=f"association and DIMSE timeout in seconds (default: "
                        f"{_DEFAULTS['timeout']:g})")
    p.set_defaults(**({} if peer_optional else {**_DEFAULTS, "called_aet": default_aec}))


def _ae_title(text: str) -> str:
    if (problem := ae_title_problem(text)) is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def seconds(text: str) -> float:
    """A --timeout: a positive number of seconds (0 or -1 gave a wait "within -1 s")."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def _max_pdu(text: str) -> int:
    """--max-pdu: a PDU is held whole in memory as it arrives (router.config.MAX_PDU)."""
    try:
        size = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of bytes: {text!r}") from None
    problem = max_pdu_problem(size)  # the configuration's max_pdu rule
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return size


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


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, default=None, metavar="FILE",
                   help="TOML configuration file (default: the embedded default)")
    p.add_argument("--spool", type=Path, default=None, metavar="DIR",
                   help="spool folder (default: from the file, else a per-user data folder "
                        "or /var/spool/dicom-router as root)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-router",
        description="DICOM router and operator tools. Exit codes: 0 ok, 1 DICOM failure "
                    "status, 2 usage error, 3 association failed.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run", help="run the router (listener, supervisor and worker processes)",
        description="Run the router: accept associations, answer C-ECHO, store every "
                    "C-STORE durably in the spool before answering Success. Without "
                    "--config it runs on the embedded default (AE title DICOM-ROUTER, "
                    "port 11112, one worker per core) and says so in its first log line. "
                    "Flags override the file. SIGTERM drains, SIGHUP reloads the file.")
    _add_runtime_args(run)
    run.add_argument("--host", default=None,
                     help="address to listen on (default 0.0.0.0); with a file, it moves "
                          "its one [[router.listen]] (refused when it has several)")
    run.add_argument("--port", type=int, default=None,
                     help="TCP port (default 11112); as --host for a file's listener")
    run.add_argument("--workers", default=None, metavar="N",
                     help="worker processes (default: one per core)")

    status = sub.add_parser(
        "status", help="workers of the running router (pid, uptime, associations, RSS, CPU)",
        description="Ask the running router (found from the same --config/--spool as "
                    "'run') for its workers and totals, and count each destination's "
                    "queue and dead letters in the spool. With no router answering, "
                    "the queues are still counted and printed; exit 3.")
    _add_runtime_args(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--prometheus", nargs="?", const="-", metavar="FILE",
        help="print the figures in Prometheus' text format, or write them to FILE by a "
             "rename, for node_exporter's textfile collector (a timer every minute: "
             "deploy/systemd); with the router down, dicom_router_up 0 and the queues "
             "are still written, and the exit code is 3")
    status.add_argument("--timeout", type=seconds, default=5.0, help="seconds to wait")

    reload = sub.add_parser("reload", help="reload the running router's configuration file",
                            description="Same as SIGHUP: an invalid file is refused and the "
                                        "running configuration stays.")
    _add_runtime_args(reload)
    reload.add_argument("--timeout", type=seconds, default=5.0, help="seconds to wait")

    queue = sub.add_parser(
        "queue", help="what waits for each destination and what failed, with reasons",
        description="Read and change the delivery queues in the spool (found from the same "
                    "--config/--spool as 'run'). Works whether the router runs or not. "
                    "DEST is a destination's name (configured, or with files in the "
                    "spool). Exit codes: 0 done, 1 the spool could not be read or "
                    "changed, 2 usage error (no such destination, no spool there).")
    qsub = queue.add_subparsers(dest="queue_command", metavar="ACTION", required=True)
    ls = qsub.add_parser("ls", help="per destination: queued instances, bytes, oldest, dead "
                                    "letters with their reasons")
    _add_runtime_args(ls)
    ls.add_argument("destination", nargs="?", default=None,
                    help="list this destination's dead letters only")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    retry = qsub.add_parser("retry", help="move dead letters back into their queue",
                            description="With no argument every dead letter, else those of "
                                        "destination DEST, or the one instance named ID "
                                        "(its file name, or DEST/ID as `queue ls` "
                                        "prints it).")
    _add_runtime_args(retry)
    retry.add_argument("target", nargs="?", default=None, metavar="DEST|ID")
    retry.add_argument("--timeout", type=seconds, default=5.0,
                       help="seconds to wait for the running router")
    retry.add_argument("--superseded", action="store_true",
                       help="also the letters a newer version of their instance "
                            "superseded (kept otherwise: sent after it, the old version "
                            "would replace the correction at the destination)")
    retry.add_argument("--unchanged", action="store_true",
                       help="also the letters a rule's change could not be made to (kept "
                            "otherwise: they are the instances as received, and would go "
                            "out without the change, a pseudonymisation say)")
    purge = qsub.add_parser("purge", help="delete a destination's dead letters",
                            description="Delete the dead letters of DEST (--dead is required: "
                                        "queued instances are never purged by this command).")
    _add_runtime_args(purge)
    purge.add_argument("destination", metavar="DEST")
    purge.add_argument("--dead", action="store_true", help="confirm: the dead letters")

    reroute = qsub.add_parser(
        "reroute", help="send the unrouted instances through the current rules again",
        description="Each instance kept in unrouted/ (no rule matched it) is sent again to "
                    "the running router, over its first listener without TLS or PROXY "
                    "protocol, from the AE title that first sent it (its file's Source "
                    "Application Entity Title), so that the rules as they are now decide "
                    "where it goes. It leaves unrouted/ once the router has acknowledged "
                    "it, which it does only when it holds it durably again: one that still "
                    "matches no rule is back in unrouted/. Oldest first. Rules on the peer "
                    "address see this machine, time windows see now; an old version of an "
                    "instance sent after its correction replaces it at the destination. "
                    "Exit 0 when every one was acknowledged, 1 when some were refused "
                    "(they stay in unrouted/), 3 when the router is not running.")
    _add_runtime_args(reroute)
    reroute.add_argument("--calling-ae", metavar="AE", default=None, type=_ae_title,
                         help="the calling AE title for instances whose file names none "
                              "(default: the router's own AE title)")
    reroute.add_argument("--timeout", type=seconds, default=30.0,
                         help="seconds to wait for the router (default: %(default)s)")

    from rules.cli import add_rules_parser
    add_rules_parser(sub)

    scp = sub.add_parser("scp", help="a simple C-ECHO/C-STORE SCP for tests (one process)",
                         description="A stand-alone C-ECHO/C-STORE SCP that prints one line "
                                     "per association and per instance, and with --output "
                                     "writes each instance durably as a Part 10 file. A test "
                                     "peer for operators; the router is 'run'.")
    scp.add_argument("--host", default="0.0.0.0",
                     help="address to listen on (default: %(default)s)")
    scp.add_argument("--port", type=int, default=11112, help="TCP port (default: %(default)s)")
    scp.add_argument("--ae-title", default="DICOM-ROUTER",
                     help="our AE title (default: %(default)s)")
    scp.add_argument("--output", type=Path, default=None, metavar="DIR",
                     help="also write each received instance as a Part 10 file into DIR")

    echo = sub.add_parser(
        "echo", help="C-ECHO a peer (verification), or a configured destination",
        description="C-ECHO HOST PORT, or with --destination NAME a destination of the "
                    "configuration (--config), exactly as the router reaches it: its "
                    "address, AE titles, PDU size, timeout and TLS settings.")
    _add_association_args(echo, peer_optional=True)
    echo.add_argument("-r", "--repeat", type=int, default=1, help="number of C-ECHOs")
    echo.add_argument("--destination", "-d", metavar="NAME", default=None,
                      help="a [[destination]] of --config, instead of HOST PORT")
    echo.add_argument("--config", "-c", type=Path, default=None, metavar="FILE",
                      help="the configuration that defines --destination")

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
    """The identifier the ``-k`` keys make; UsageError naming the key that cannot
    be one (a key that is no attribute, a value its VR cannot encode)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for item in keys:
        one = Dataset()
        pydicom_log = logging.getLogger("pydicom")
        with warnings.catch_warnings():
            # pydicom's value checks warn and log: encoding tells, in one line.
            warnings.simplefilter("ignore")
            pydicom_log.disabled = True
            try:
                _add_key(one, item)
                encode_dataset(one, uids.EXPLICIT_VR_LITTLE_ENDIAN)
            except UsageError:
                raise
            except Exception as exc:  # pydicom raises many kinds for a bad value
                detail = logline.first_line(exc)
                raise UsageError(f"-k {item}: not a value for it: {detail}") from None
            finally:
                pydicom_log.disabled = False
        ds.update(one)
    return ds


def _add_key(ds: Dataset, item: str) -> None:
    """One ``-k KEY=VALUE`` (a keyword or gggg,eeee; no value: a return key) to ``ds``."""
    key, _, value = item.partition("=")
    key = key.strip()
    if not key:
        raise UsageError(f"-k {item}: no attribute before the '='")
    if "," not in key:
        if tag_for_keyword(key) is None:
            raise UsageError(f"unknown attribute keyword {key!r}")
        setattr(ds, key, value)
        return
    group, _, elem = key.partition(",")
    try:
        tag = (int(group, 16) << 16) | int(elem, 16)
    except ValueError:
        raise UsageError(f"bad tag {key!r}: expected gggg,eeee in hex") from None
    from pydicom.datadict import dictionary_VR, keyword_for_tag
    if not keyword_for_tag(tag):
        raise UsageError(f"unknown tag {key!r}")
    ds.add_new(tag, dictionary_VR(tag), value or None)


# --------------------------------------------------------------- commands


def _open(args: argparse.Namespace, contexts: Sequence[tuple[str, Sequence[str]]],
          **kwargs: object) -> ClientAssociation:
    return connect(args.host, args.port, calling_ae=args.calling_aet, called_ae=args.called_aet,
                   contexts=contexts, max_pdu=args.max_pdu, acse_timeout=args.timeout,
                   dimse_timeout=args.timeout, **kwargs)  # type: ignore[arg-type]


def cmd_echo(args: argparse.Namespace) -> int:
    ts = (uids.EXPLICIT_VR_LITTLE_ENDIAN, uids.IMPLICIT_VR_LITTLE_ENDIAN)
    if args.destination is not None:
        if args.host is not None:
            raise UsageError("give HOST PORT or --destination NAME, not both")
        return _echo_destination(args)
    if args.host is None or args.port is None:
        raise UsageError("echo needs HOST and PORT (or --destination NAME)")
    for key, value in _DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    with _open(args, [(uids.VERIFICATION_SOP_CLASS, ts)]) as assoc:
        for _ in range(args.repeat):
            status = assoc.echo()
            print(f"C-ECHO {args.called_aet}@{args.host}:{args.port}: status 0x{status:04X}")
            if status != dimse.SUCCESS:
                return EXIT_FAILED
    return EXIT_OK


def _echo_destination(args: argparse.Namespace) -> int:
    """C-ECHO a configured destination over the router's own outbound code, TLS
    included: what a failed forward would meet, before any instance waits on it."""
    import asyncio

    from workers.outbound import OutboundError, open_association

    try:  # the TLS files are read: they are what is being tested
        config = load_config(args.config)
    except ConfigError as exc:
        raise ConfigUsageError(str(exc)) from None
    try:
        destination = config.destination(args.destination)
    except KeyError:
        known = ", ".join(d.name for d in config.destinations) or "none"
        raise UsageError(f"no destination named {args.destination!r} in "
                         f"{config.source} (known: {known})") from None
    given = {field: value for field, value in (
        ("calling_ae", args.calling_aet), ("ae_title", args.called_aet),
        ("max_pdu", args.max_pdu), ("timeout", args.timeout)) if value is not None}
    try:  # what the engineer asks to try instead of the file's value
        destination = dataclasses.replace(destination, **given)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    ts = [uids.EXPLICIT_VR_LITTLE_ENDIAN, uids.IMPLICIT_VR_LITTLE_ENDIAN]

    async def echo() -> int:
        assoc = await open_association(destination, [(uids.VERIFICATION_SOP_CLASS, ts)],
                                       label=f"echo {destination.name}")
        try:
            ctx = assoc.context_for_model(uids.VERIFICATION_SOP_CLASS)
            if ctx is None:
                print(f"C-ECHO {destination}: verification not accepted")
                return EXIT_FAILED
            for _ in range(args.repeat):
                rsp, _ = await assoc.n_request(ctx, dimse.CEchoRQ(
                    message_id=assoc.next_message_id(),
                    affected_sop_class_uid=uids.VERIFICATION_SOP_CLASS), None)
                print(f"C-ECHO {destination}: status 0x{rsp.status:04X}")
                if rsp.status != dimse.SUCCESS:
                    return EXIT_FAILED
        finally:
            await assoc.release()
        return EXIT_OK

    try:
        return asyncio.run(echo())
    except OutboundError as exc:
        print(f"dicom-router: C-ECHO {destination}: {exc}", file=sys.stderr)
        return EXIT_NETWORK


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
    contexts = _store_contexts(h for _, h in headers)
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


def _store_contexts(headers: Iterable[Part10]) -> list[tuple[str, list[str]]]:
    """The presentation contexts to propose for sending these files: each one's own
    transfer syntax, and for an uncompressed one both little-endian syntaxes too."""
    proposals: dict[str, list[str]] = {}
    for h in headers:
        ts_list = proposals.setdefault(h.sop_class_uid, [])
        for ts in (h.transfer_syntax, uids.EXPLICIT_VR_LITTLE_ENDIAN,
                   uids.IMPLICIT_VR_LITTLE_ENDIAN):
            if ts not in ts_list and (ts == h.transfer_syntax or uids.is_uncompressed(
                    h.transfer_syntax)):
                ts_list.append(ts)
    # One context per (SOP class, TS) keeps acceptors that pick one TS per
    # context from refusing files in the other syntaxes (storescu does the same).
    return [(sop, [ts]) for sop, tss in proposals.items() for ts in tss]


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
        print(f"C-FIND: {n} results, final status 0x{status:04X}"
              + _comment(assoc.final_comment))
    return EXIT_OK if status == dimse.SUCCESS else EXIT_FAILED


def cmd_move(args: argparse.Namespace) -> int:
    model = _MODELS[(args.model, "move")]
    ts = (uids.EXPLICIT_VR_LITTLE_ENDIAN, uids.IMPLICIT_VR_LITTLE_ENDIAN)
    last = None
    with _open(args, [(model, ts)]) as assoc:
        for rsp in assoc.move(_query(args.key, args.level), args.dest, model=model):
            last = rsp
            # Counts a response does not carry (PS3.7 C.4.2.1.6: optional in a final
            # one) are left out, not printed as None.
            counts = [f"{name} {value}" for name, value in (
                ("remaining", rsp.number_of_remaining_sub_operations),
                ("completed", rsp.number_of_completed_sub_operations),
                ("failed", rsp.number_of_failed_sub_operations),
                ("warning", rsp.number_of_warning_sub_operations)) if value is not None]
            print(f"C-MOVE status 0x{rsp.status:04X}"
                  + (f" {' '.join(counts)}" if counts else "")
                  + _comment(rsp.error_comment))
    return EXIT_OK if last is not None and last.status == dimse.SUCCESS else EXIT_FAILED


def _comment(text: str | None) -> str:
    return f" ({text})" if text else ""


# Storage SOP classes `get` offers to receive (PS3.4 B.5), most common first:
# an association has room for 128 presentation contexts, and there are ~190
# storage classes, so a C-GET proposes what archives actually hold.
# (image class?, UID) -- image classes also get contexts for compressed syntaxes.
GET_STORAGE_CLASSES: tuple[tuple[bool, str], ...] = (
    (True, "1.2.840.10008.5.1.4.1.1.2"),  # CT Image
    (True, "1.2.840.10008.5.1.4.1.1.4"),  # MR Image
    (True, "1.2.840.10008.5.1.4.1.1.1"),  # Computed Radiography Image
    (True, "1.2.840.10008.5.1.4.1.1.1.1"),  # Digital X-Ray - For Presentation
    (True, "1.2.840.10008.5.1.4.1.1.1.2"),  # Digital Mammography - For Presentation
    (True, "1.2.840.10008.5.1.4.1.1.6.1"),  # Ultrasound Image
    (True, "1.2.840.10008.5.1.4.1.1.3.1"),  # Ultrasound Multi-frame Image
    (True, "1.2.840.10008.5.1.4.1.1.12.1"),  # X-Ray Angiographic Image
    (True, "1.2.840.10008.5.1.4.1.1.12.2"),  # X-Ray Radiofluoroscopic Image
    (True, "1.2.840.10008.5.1.4.1.1.20"),  # Nuclear Medicine Image
    (True, "1.2.840.10008.5.1.4.1.1.128"),  # Positron Emission Tomography Image
    (True, "1.2.840.10008.5.1.4.1.1.7"),  # Secondary Capture Image
    (True, "1.2.840.10008.5.1.4.1.1.2.1"),  # Enhanced CT Image
    (True, "1.2.840.10008.5.1.4.1.1.4.1"),  # Enhanced MR Image
    (True, "1.2.840.10008.5.1.4.1.1.13.1.3"),  # Breast Tomosynthesis Image
    (True, "1.2.840.10008.5.1.4.1.1.1.1.1"),  # Digital X-Ray - For Processing
    (True, "1.2.840.10008.5.1.4.1.1.1.2.1"),  # Digital Mammography - For Processing
    (True, "1.2.840.10008.5.1.4.1.1.7.1"),  # Multi-frame Single Bit SC
    (True, "1.2.840.10008.5.1.4.1.1.7.2"),  # Multi-frame Grayscale Byte SC
    (True, "1.2.840.10008.5.1.4.1.1.7.3"),  # Multi-frame Grayscale Word SC
    (True, "1.2.840.10008.5.1.4.1.1.7.4"),  # Multi-frame True Color SC
    (True, "1.2.840.10008.5.1.4.1.1.481.1"),  # RT Image
    (True, "1.2.840.10008.5.1.4.1.1.12.1.1"),  # Enhanced XA Image
    (True, "1.2.840.10008.5.1.4.1.1.12.2.1"),  # Enhanced XRF Image
    (True, "1.2.840.10008.5.1.4.1.1.13.1.1"),  # X-Ray 3D Angiographic Image
    (True, "1.2.840.10008.5.1.4.1.1.130"),  # Enhanced PET Image
    (True, "1.2.840.10008.5.1.4.1.1.6.2"),  # Enhanced US Volume
    (True, "1.2.840.10008.5.1.4.1.1.13.1.4"),  # Breast Projection X-Ray - For Presentation
    (True, "1.2.840.10008.5.1.4.1.1.13.1.5"),  # Breast Projection X-Ray - For Processing
    (True, "1.2.840.10008.5.1.4.1.1.1.3"),  # Digital Intra-Oral X-Ray - For Presentation
    (True, "1.2.840.10008.5.1.4.1.1.77.1.1"),  # VL Endoscopic Image
    (True, "1.2.840.10008.5.1.4.1.1.77.1.4"),  # VL Photographic Image
    (True, "1.2.840.10008.5.1.4.1.1.77.1.5.1"),  # Ophthalmic Photography 8 Bit Image
    (True, "1.2.840.10008.5.1.4.1.1.77.1.5.4"),  # Ophthalmic Tomography Image
    (True, "1.2.840.10008.5.1.4.1.1.77.1.6"),  # VL Whole Slide Microscopy Image
    (True, "1.2.840.10008.5.1.4.1.1.4.3"),  # Enhanced MR Color Image
    (False, "1.2.840.10008.5.1.4.1.1.88.59"),  # Key Object Selection Document
    (False, "1.2.840.10008.5.1.4.1.1.104.1"),  # Encapsulated PDF
    (False, "1.2.840.10008.5.1.4.1.1.104.2"),  # Encapsulated CDA
    (False, "1.2.840.10008.5.1.4.1.1.11.1"),  # Grayscale Softcopy Presentation State
    (False, "1.2.840.10008.5.1.4.1.1.11.2"),  # Color Softcopy Presentation State
    (False, "1.2.840.10008.5.1.4.1.1.88.11"),  # Basic Text SR
    (False, "1.2.840.10008.5.1.4.1.1.88.22"),  # Enhanced SR
    (False, "1.2.840.10008.5.1.4.1.1.88.33"),  # Comprehensive SR
    (False, "1.2.840.10008.5.1.4.1.1.88.34"),  # Comprehensive 3D SR
    (False, "1.2.840.10008.5.1.4.1.1.88.35"),  # Extensible SR
    (False, "1.2.840.10008.5.1.4.1.1.88.50"),  # Mammography CAD SR
    (False, "1.2.840.10008.5.1.4.1.1.88.65"),  # Chest CAD SR
    (False, "1.2.840.10008.5.1.4.1.1.88.67"),  # X-Ray Radiation Dose SR
    (False, "1.2.840.10008.5.1.4.1.1.88.68"),  # Radiopharmaceutical Radiation Dose SR
    (False, "1.2.840.10008.5.1.4.1.1.88.71"),  # Acquisition Context SR
    (False, "1.2.840.10008.5.1.4.1.1.88.73"),  # Patient Radiation Dose SR
    (False, "1.2.840.10008.5.1.4.1.1.88.40"),  # Procedure Log
    (False, "1.2.840.10008.5.1.4.1.1.66.4"),  # Segmentation
    (False, "1.2.840.10008.5.1.4.1.1.30"),  # Parametric Map
    (False, "1.2.840.10008.5.1.4.1.1.66"),  # Raw Data
    (False, "1.2.840.10008.5.1.4.1.1.66.1"),  # Spatial Registration
    (False, "1.2.840.10008.5.1.4.1.1.66.3"),  # Deformable Spatial Registration
    (False, "1.2.840.10008.5.1.4.1.1.481.2"),  # RT Dose
    (False, "1.2.840.10008.5.1.4.1.1.481.3"),  # RT Structure Set
    (False, "1.2.840.10008.5.1.4.1.1.481.5"),  # RT Plan
    (False, "1.2.840.10008.5.1.4.1.1.481.4"),  # RT Beams Treatment Record
    (False, "1.2.840.10008.5.1.4.1.1.481.6"),  # RT Brachy Treatment Record
    (False, "1.2.840.10008.5.1.4.1.1.481.7"),  # RT Treatment Summary Record
    (False, "1.2.840.10008.5.1.4.1.1.481.8"),  # RT Ion Plan
    (False, "1.2.840.10008.5.1.4.1.1.481.9"),  # RT Ion Beams Treatment Record
    (False, "1.2.840.10008.5.1.4.1.1.9.1.1"),  # 12-lead ECG Waveform
    (False, "1.2.840.10008.5.1.4.1.1.9.1.2"),  # General ECG Waveform
)

JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"  # PS3.5 A.4.1, Process 14 SV1
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"  # PS3.5 A.4.4
JPEG_2000 = "1.2.840.10008.1.2.4.91"


def get_contexts(
    model: str,
) -> tuple[list[tuple[str, Sequence[str]]], dict[str, tuple[bool, bool]]]:
    """Presentation contexts and SCP role proposals for a C-GET (PS3.4 C.4.3).

    The query model, then one context per storage class in explicit or implicit
    VR LE; then, while room is left (128 contexts, PS3.8 §9.3.2.2), separate
    contexts for image classes in JPEG Lossless, then in JPEG 2000, so an
    archive can deliver what it holds compressed (one context per syntax
    family: an acceptor picks one transfer syntax per context)."""
    uncompressed = [uids.EXPLICIT_VR_LITTLE_ENDIAN, uids.IMPLICIT_VR_LITTLE_ENDIAN]
    contexts: list[tuple[str, Sequence[str]]] = [(model, uncompressed)]
    contexts += [(sop, uncompressed) for _, sop in GET_STORAGE_CLASSES]
    images = [sop for image, sop in GET_STORAGE_CLASSES if image]
    for syntaxes in ([JPEG_LOSSLESS_SV1], [JPEG_2000_LOSSLESS, JPEG_2000]):
        for sop in images:
            if len(contexts) == MAX_PRESENTATION_CONTEXTS:
                break
            contexts.append((sop, syntaxes))
    roles = {sop: (False, True) for _, sop in GET_STORAGE_CLASSES}
    return contexts, roles


def cmd_get(args: argparse.Namespace) -> int:
    model = _MODELS[(args.model, "get")]
    # Storage classes for the sub-operations, with us as SCP (PS3.4 C.4.3).
    contexts, roles = get_contexts(model)
    args.out.mkdir(parents=True, exist_ok=True)
    received = 0

    def on_store(rq: dimse.CStoreRQ, data: bytes, transfer_syntax: str) -> int:
        nonlocal received
        uid = rq.affected_sop_instance_uid
        # The server names the file: only a UID with a component on each side of
        # every dot (no "..", no hidden ".dcm") becomes a file name as it is.
        name = uid if uids.is_plain_uid(uid) else f"unnamed-{received + 1}"
        path = args.out / f"{name}.dcm"
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
          f"0x{last.status if last else 0xFFFF:04X}"
          + _comment(last.error_comment if last else None))
    return EXIT_OK if last is not None and last.status == dimse.SUCCESS else EXIT_FAILED


_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP})


class ReceivedFile:
    """One instance received by ``run``: counted, and with ``--output`` written
    as a Part 10 file the way DESIGN.md D4 requires before Success is answered.

    The data set streams into a temporary file opened with O_EXCL; at the end
    it is fsynced and linked to ``<uuid4>.dcm`` (a name never derived from the
    data set, and link(2) never replaces an existing file), and the folder is
    fsynced: the file and its name are on disk when the peer hears Success. If
    anything fails the temporary file is removed and the answer is A700H (out
    of resources: disk full) or 0110H (processing failure), PS3.4 B.2.3.
    """

    def __init__(self, request: Request, folder: Path | None) -> None:
        self.request = request
        self.folder = folder
        self.size = 0
        self.tmp: Path | None = None
        self.path: Path | None = None
        self._linked = False
        self._fh: IO[bytes] | None = None
        if folder is None:
            return
        name = uuid.uuid4().hex
        self.tmp = folder / f".{name}.part"
        self.path = folder / f"{name}.dcm"
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self._fh = os.fdopen(fd, "wb")
        msg = request.message
        try:
            self._fh.write(part10_meta_bytes(
                sop_class_uid=msg.affected_sop_class_uid,
                sop_instance_uid=msg.affected_sop_instance_uid,
                transfer_syntax=request.context.transfer_syntax,
                source_ae_title=request.assoc.calling_ae))
        except BaseException:
            self.abort()
            raise

    def write(self, data: memoryview) -> None:
        if self._fh is not None:
            self._fh.write(data)
        self.size += len(data)

    def close(self) -> int:
        msg = self.request.message
        if self._fh is not None:
            assert self.tmp is not None and self.path is not None and self.folder is not None
            try:
                self._fh.flush()
                os.fsync(self._fh.fileno())
                self._fh.close()
                self._fh = None
                self._publish(self.tmp, self.path)
                self.tmp = None
                _fsync_folder(self.folder)
            except OSError as exc:
                status = (dimse.REFUSED_OUT_OF_RESOURCES if exc.errno in _DISK_FULL
                          else dimse.PROCESSING_FAILURE)
                log.warning("%s C-STORE %s: cannot write it to %s (%s): answering 0x%04X",
                            self.request.assoc, msg.affected_sop_instance_uid, self.folder,
                            exc, status)
                self.abort()
                return status
        print(f"{self.request.assoc} C-STORE {msg.affected_sop_class_uid} "
              f"{msg.affected_sop_instance_uid} {self.size} bytes"
              + (f" -> {self.path}" if self.path is not None else ""), flush=True)
        return dimse.SUCCESS

    def _publish(self, tmp: Path, path: Path) -> None:
        # link + unlink, not rename: link(2) fails rather than replace a file.
        try:
            os.link(tmp, path)
            self._linked = True
            tmp.unlink()
        except OSError as exc:
            if self._linked or exc.errno not in _NO_HARD_LINKS:
                raise
            os.rename(tmp, path)  # a file system without hard links; the name is new
            self._linked = True

    def abort(self) -> None:
        """Discard: close and remove what was written (nothing was acknowledged)."""
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None
        for leftover in (self.tmp, self.path if self._linked else None):
            if leftover is not None:
                with contextlib.suppress(OSError):
                    leftover.unlink()
        self.tmp = None
        self.path = None
        self._linked = False


def _fsync_folder(folder: Path) -> None:
    # The rename is durable only once the directory entry is (fsync(2)).
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_handlers(out: Path | None) -> Handlers:
    """The handlers of ``dicom-router run``: C-ECHO, and C-STORE streamed into
    :class:`ReceivedFile` (into ``out`` if given)."""

    def on_store(req: Request) -> StoreSink:
        return ReceivedFile(req, out)

    def on_echo(req: Request) -> int:
        print(f"{req.assoc} C-ECHO", flush=True)
        return dimse.SUCCESS

    return Handlers(on_c_echo=on_echo, on_c_store_stream=on_store)


def _runtime_config(args: argparse.Namespace) -> tuple[Config, dict[str, object]]:
    overrides = _overrides(args)
    try:
        # status and queue use no TLS file (the operator may not read the key).
        return load_config(args.config, overrides=overrides, check_files=False), overrides
    except ConfigError as exc:
        raise ConfigUsageError(str(exc)) from None


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    """The flags of ``run``/``status`` that override the configuration file."""
    overrides: dict[str, object] = {"spool": args.spool}
    for key in ("host", "port", "workers"):
        value = getattr(args, key, None)
        if key == "workers" and value is not None and value != "auto":
            try:
                value = int(value)
            except ValueError:
                raise UsageError(f"--workers: expected an integer or 'auto', got {value!r}")\
                    from None
        overrides[key] = value
    return overrides


def cmd_run(args: argparse.Namespace) -> int:
    from router.snapshot import Snapshot
    from router.supervisor import Supervisor
    from rules import RuleError

    overrides = _overrides(args)
    try:
        # The files are read once: what is checked here is what the workers run.
        snapshot, config, rules = Snapshot.read(args.config, overrides=overrides)
    except (ConfigError, RuleError) as exc:
        raise ConfigUsageError(str(exc)) from None
    logging.getLogger().setLevel(config.log_level)
    return Supervisor(config, config_path=args.config, overrides=overrides,
                      snapshot=snapshot, rules=rules).run()


def _admin(args: argparse.Namespace, name: str,
           config: Config | None = None) -> dict[str, Any]:
    import zmq

    from router import control

    if config is None:
        config, _ = _runtime_config(args)
    endpoints = control.Endpoints.for_run_dir(str(config.spool / "run"),
                                              admin_path=config.admin_socket)
    ctx = zmq.Context()
    try:
        try:
            reply = control.admin_request(ctx, endpoints.admin, control.Command(name=name),
                                          args.timeout)
        except control.ControlError as exc:
            problem = f"no router answering at {config.admin_socket}: {exc}"
            elsewhere = _admin_elsewhere(args.config, config.admin_socket)
            if elsewhere is None:
                raise RouterNotRunning(problem) from None
            pid, admin = elsewhere
            try:
                reply = control.admin_request(ctx, f"ipc://{admin}",
                                              control.Command(name=name), args.timeout)
            except control.ControlError:
                raise RouterNotRunning(
                    f"{problem}; the router running on {args.config} (pid {pid}) does not "
                    f"answer at {admin} either") from None
            # Said once per command (reload asks twice), and by every command until
            # the restart that moves the router to the file's paths.
            if admin not in _SAID_ELSEWHERE:
                _SAID_ELSEWHERE.add(admin)
                print(f"dicom-router: the router running on {args.config} (pid {pid}) answers at "
                      f"{admin}, not at {config.admin_socket} as the file now says: its "
                      "[spool] path or [admin] socket changed since the router started, and "
                      "only a restart applies that", file=sys.stderr)
    finally:
        ctx.term()
    if not reply.ok:
        raise UsageError(f"{name}: {reply.error}")
    return dict(reply.result)


_SAID_ELSEWHERE: set[str] = set()


def _admin_elsewhere(config_file: Path | None, expected: Path) -> tuple[int, str] | None:
    """A ``dicom-router run`` process started on ``config_file`` whose admin socket is
    not ``expected`` (the path the file gives now): (its pid, its admin socket).

    The CLI finds a router through the file's [spool] path or [admin] socket, so an
    edit of either made ``status`` report a running router as down (and its queues
    empty) and ``reload`` fail, until the restart the edit needs. The process is
    recognised by its command line; its admin socket is the one it listens on that
    is not one of the run directory's own (router.control.Endpoints)."""
    import psutil

    from router import control

    if config_file is None:
        return None
    try:
        wanted = config_file.resolve(strict=True)
    except OSError:
        return None
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            argv = proc.info["cmdline"] or []
            given = _run_config_of(argv)
            if given is None or (Path(proc.cwd()) / given).resolve() != wanted:
                continue
            for conn in proc.net_connections(kind="unix"):
                path = conn.laddr
                if (isinstance(path, str) and path and os.path.basename(path) not in (
                        control.CONTROL_SOCKET, control.BROADCAST_SOCKET)
                        and Path(path) != expected):
                    return proc.pid, path
        except (psutil.Error, OSError):
            continue  # gone meanwhile, or another user's
    return None


def _run_config_of(argv: list[str]) -> str | None:
    """The --config of a ``dicom-router run`` (or ``python -m router.cli run``) command
    line; None for any other."""
    try:
        at = next(i for i, arg in enumerate(argv)
                  if arg == "router.cli" or os.path.basename(arg) == "dicom-router")
    except StopIteration:
        return None
    rest = argv[at + 1:]
    if "run" not in rest:
        return None
    for i, arg in enumerate(rest):
        if arg == "--config" and i + 1 < len(rest):
            return rest[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def cmd_status(args: argparse.Namespace) -> int:
    config, _ = _runtime_config(args)
    try:
        result = _admin(args, "status", config)
    except RouterNotRunning as exc:
        # What waits in the spool is what an operator asks first when the router is
        # down: the queues are counted from the files, without it.
        down: dict[str, Any] = {"running": False, "error": str(exc)}
        _count_queues(config, down)
        if args.prometheus:
            try:
                _prometheus(args.prometheus, down)
            except UsageError as problem:  # said, but the router being down comes first
                print(f"dicom-router status: {problem}", file=sys.stderr)
        elif args.json:
            print(json.dumps(down, indent=2))
        else:
            print(_queue_line(down))
        print(f"dicom-router status: {exc}", file=sys.stderr)
        return EXIT_NETWORK
    result["running"] = True
    if isinstance(result.get("spool"), str):  # the running router's, which may not be
        config = dataclasses.replace(config, spool=Path(result["spool"]))  # the file's now
    _count_queues(config, result)
    if args.prometheus:
        _prometheus(args.prometheus, result)
        return EXIT_OK
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    workers = result.get("workers", [])
    print(f"router pid {result.get('pid')}, up {result.get('uptime')} s, configuration "
          f"generation {result.get('generation')} from {result.get('config')}"
          + (", draining" if result.get("draining") else ""))
    print(f"{'worker':>6} {'pid':>8} {'uptime s':>9} {'open':>5} {'served':>7} "
          f"{'stored':>8} {'failed':>6} {'fwd':>8} {'queued':>7} "
          f"{'RSS MB':>7} {'CPU %':>6} {'restarts':>8}")
    keys = ("open_associations", "served_total", "instances_stored", "instances_failed",
            "instances_forwarded", "rss")
    totals = dict.fromkeys(keys, 0)
    for w in workers:
        print(f"{w['worker_id']:>6} {w['pid']:>8} {w['uptime']:>9.1f} "
              f"{w['open_associations']:>5} {w['served_total']:>7} "
              f"{w.get('instances_stored', 0):>8} {w.get('instances_failed', 0):>6} "
              f"{w.get('instances_forwarded', 0):>8} {w.get('queued', 0):>7} "
              f"{w['rss'] / 1e6:>7.1f} {w['cpu_percent']:>6.1f} {w['restarts']:>8}")
        for key in keys:
            totals[key] += int(w.get(key, 0))
    queues: dict[str, dict[str, int]] = result.get("queues", {})
    print(f"{'total':>6} {'':>8} {'':>9} {totals['open_associations']:>5} "
          f"{totals['served_total']:>7} {totals['instances_stored']:>8} "
          f"{totals['instances_failed']:>6} {totals['instances_forwarded']:>8} "
          f"{sum(c['queued'] for c in queues.values()):>7} {totals['rss'] / 1e6:>7.1f}")
    print("served, stored/failed (instances received), fwd (delivered): since the router "
          "started; queued: a worker's share in memory, the total from the spool")
    print(_queue_line(result))
    for line in _failing_lines(result.get("failing")):
        print(line)
    return EXIT_OK


def _running_status(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    """The running router's status, or {} if none answers within 2 s."""
    try:
        return _admin(argparse.Namespace(**{**vars(args), "timeout": 2.0}), "status", config)
    except (RouterNotRunning, UsageError):
        return {}


def _failing_lines(failing: object) -> list[str]:
    """A line per destination ``failing`` (status's map of those failing since their
    last delivery): a destination that rejects every association keeps its queue,
    and only the log said why."""
    import datetime

    now = time.time()
    lines = []
    for name, state in sorted(failing.items() if isinstance(failing, dict) else ()):
        since = float(state.get("since", now))
        lines.append(f"destination {name}: failing since "
                     f"{datetime.datetime.fromtimestamp(since):%Y-%m-%d %H:%M:%S} "
                     f"(for {logline.duration(now - since)}): {state.get('error', '')}")
    return lines


def _prometheus(target: str, result: dict[str, Any]) -> None:
    from router import metrics

    text = metrics.exposition(result)
    if target == "-":
        print(text, end="")
        return
    try:
        metrics.write_atomically(Path(target), text)
    except OSError as exc:
        raise UsageError(f"cannot write {target}: {exc.strerror or exc}") from None


def _count_queues(config: Config, result: dict[str, Any]) -> None:
    """The queues from the spool itself into ``result``: the workers each know a part
    of a shared queue, some parts twice, and their sum said 600 for 300 files."""
    from workers import queue as q

    if not config.spool.is_dir():
        # Else a mistyped spool counted empty queues: "all delivered", spool readable.
        result["queues_error"] = f"no spool at {config.spool}"
        return
    try:
        result["queues"] = q.counts(config.spool, [d.name for d in config.destinations])
        result["unrouted"] = q.unrouted_count(config.spool)
    except OSError as exc:
        result["queues_error"] = f"cannot read the spool {config.spool}: {exc.strerror}"


def _queue_line(result: dict[str, Any]) -> str:
    if "queues_error" in result:
        return f"queues: {result['queues_error']}"
    queues: dict[str, dict[str, int]] = result["queues"]
    return "queues: " + (", ".join(
        f"{name} {c['queued']} queued" + (f", {c['dead']} dead" if c["dead"] else "")
        for name, c in queues.items()) or "no destination") + \
        f"; unrouted: {result.get('unrouted', 0)}"


def cmd_reload(args: argparse.Namespace) -> int:
    config, _ = _runtime_config(args)
    # The router re-reads the file it was started with: another file given here was
    # checked, then "reloaded: ..." said while the router went on with its own.
    running = _admin(args, "status", config).get("config")
    if args.config is not None and isinstance(running, str) and Path(running).exists() \
            and not Path(running).samefile(args.config):
        raise UsageError(f"the router on this spool runs on {running}, not on {args.config}: "
                         f"reload re-reads {running}; to run on {args.config}, restart it "
                         "with that file")
    result = _admin(args, "reload", config)
    print(f"reloaded: configuration generation {result.get('generation')}"
          + (f"; {result['warning']}" if result.get("warning") else ""))
    return EXIT_OK


def cmd_scp(args: argparse.Namespace) -> int:
    out: Path | None = args.output
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    policy = AcceptorPolicy(
        abstract_syntaxes={uids.VERIFICATION_SOP_CLASS: None,
                           **dict.fromkeys(uids.storage_sop_classes())})
    handlers = run_handlers(out)
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


def cmd_queue(args: argparse.Namespace) -> int:
    """``queue ls|retry|purge``: read and change the spool's queues on disk.

    Works whether the router runs or not (the files are the state, see
    workers/queue.py); after a retry, a running router is asked to look at its
    queues again, and told nothing if it is not running.
    """
    from workers import queue as q
    from workers.spool import DEAD_DIR, INCOMING_DIR, QUEUE_DIR, TMP_DIR, UNROUTED_DIR

    config, _ = _runtime_config(args)
    root = config.spool
    names = [d.name for d in config.destinations]
    if not root.is_dir():
        raise UsageError(f"no spool at {root} (--spool, or [spool] path in --config)")
    if not any((root / folder).is_dir() for folder in (
            QUEUE_DIR, DEAD_DIR, UNROUTED_DIR, INCOMING_DIR, TMP_DIR)):
        # Else a mistyped --spool listed nothing and said all was well. (A router
        # makes incoming/ and tmp/ at its first start, queue/ at its first instance.)
        raise UsageError(f"{root} is not a router spool (no {QUEUE_DIR}/, {INCOMING_DIR}/ "
                         f"or {UNROUTED_DIR}/ in it): --spool, or [spool] path in --config")

    def destination(text: str) -> str:
        """A destination named on the command line: configured, or with a queue or
        dead letters in the spool. Never a path: '../queue/pacs' would reach the
        instances still waiting, and '' every destination."""
        known = q.known_destinations(root, names)  # every one a destination name
        if text in known:
            return text
        raise UsageError(f"no destination named {text!r} (known here: "
                         f"{', '.join(known) or 'none'})")

    try:
        return _queue_action(args, config, root, names, destination)
    except BrokenPipeError:
        raise  # the reader closed the pipe (`| head`): main ends quietly
    except OSError as exc:  # the spool itself: permissions, not a directory, ...
        print(f"dicom-router: queue {args.queue_command}: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _queue_action(args: argparse.Namespace, config: Config, root: Path, names: list[str],
                  destination: Callable[[str], str]) -> int:
    import datetime

    from workers import queue as q

    if args.queue_command == "ls":
        if args.destination is not None:
            destination(args.destination)
        # DEST: that destination's line and dead letters only, in text and JSON alike.
        summaries = [s for s in q.summarize(root, names)
                     if args.destination in (None, s.destination)]
        # Why a queue does not move, from the running router (the spool cannot say:
        # an unreachable destination's instances count no failure).
        failing: dict[str, Any] = _running_status(args, config).get("failing") or {}
        if args.json:
            print(json.dumps({
                "spool": str(root),
                "unrouted": q.unrouted_count(root),
                "destinations": [{
                    "destination": s.destination, "queued": s.queued,
                    "queued_bytes": s.queued_bytes, "oldest": s.oldest, "dead": s.dead,
                    "failing": failing.get(s.destination),
                    "dead_letters": [{"name": d.name, "reason": d.reason, "status": d.status,
                                      "attempts": d.attempts, "time": d.time,
                                      "sop_instance_uid": d.sop_instance_uid,
                                      "superseded_by": d.superseded_by,
                                      "unchanged": d.unchanged}
                                     for d in q.dead_letters(root, s.destination)],
                } for s in summaries]}, indent=2))
            return EXIT_OK
        print(f"spool {root}: {q.unrouted_count(root)} unrouted instance(s)")
        print(f"{'destination':<20} {'queued':>7} {'MB':>9} {'oldest':>20} {'dead':>6}")
        for s in summaries:
            oldest = "-" if s.oldest is None else datetime.datetime.fromtimestamp(
                s.oldest).strftime("%Y-%m-%d %H:%M:%S")
            configured = "" if s.destination in names else "  (not configured)"
            print(f"{s.destination:<20} {s.queued:>7} {s.queued_bytes / 1e6:>9.1f} "
                  f"{oldest:>20} {s.dead:>6}{configured}")
        for line in _failing_lines({name: state for name, state in failing.items()
                                    if args.destination in (None, name)}):
            print(line)
        for letter in q.dead_letters(root, args.destination):
            status = "" if letter.status is None else f" status 0x{letter.status:04X}"
            uid = f" ({letter.sop_instance_uid})" if letter.sop_instance_uid else ""
            print(f"dead {letter.destination}/{letter.name}{uid}:{status} after "
                  f"{letter.attempts} attempt(s): {letter.reason}")
        return EXIT_OK
    if args.queue_command == "retry":
        target = args.target
        dest: str | None = None
        name: str | None = None
        if target is not None and "/" in target:
            # DEST/ID, as `queue ls` prints a dead letter
            dest_text, _, name = target.partition("/")
            if dest_text:
                dest = destination(dest_text)
            if not dest_text or not name or "/" in name:
                raise UsageError(f"no dead letter matches {target!r}: expected DEST, ID "
                                 "or DEST/ID as `queue ls` prints them, not a path")
        elif target is not None:
            try:
                dest = destination(target)
            except UsageError:
                name = target  # an instance's file name
        retried = q.retry_dead(root, dest, name, superseded=args.superseded,
                               configured=names, unchanged=args.unchanged)
        moved = retried.moved
        for gone, count in sorted(retried.unconfigured.items()):
            # Their queue would hold them for nobody, and the dead-letter count (an
            # alert) would drop to 0 as if they had been dealt with.
            print(f"kept {count} dead letter(s) of {gone}: it is not configured, so "
                  "nothing would send them; configure it again, then retry (or purge "
                  "them)", file=sys.stderr)
        if retried.unconfigured and moved == 0:  # all, DEST or ID alike (README)
            return EXIT_FAILED
        if name is not None and moved == 0 and not retried.kept \
                and not retried.unconfigured:
            # A destination with nothing dead is not an error (a nightly `queue retry
            # pacs` must not fail); a name that matches nothing is.
            raise UsageError(f"no dead letter matches {target!r} (a destination or an "
                             "instance file name, see `queue ls`)")
        print(f"{moved} instance(s) moved back to their queue")
        for letter in retried.kept:
            if letter.unchanged and not args.unchanged:
                print(f"kept {letter.destination}/{letter.name}: a rule's change could not "
                      f"be made to it ({letter.reason}); sent, it would go out as received, "
                      "without that change (--unchanged sends it all the same)")
                continue
            print(f"kept {letter.destination}/{letter.name}: superseded by "
                  f"{letter.superseded_by}, a newer version of the instance, which may "
                  "be delivered by now; sent again, this old version would replace it "
                  "(--superseded sends it all the same)")
        try:
            _admin(args, "rescan", config)
        except RouterNotRunning:
            print("the router is not running: they go out when it starts")
        return EXIT_OK
    if args.queue_command == "reroute":
        return _reroute(args, config, root)
    # purge
    if not args.dead:
        raise UsageError("purge deletes dead letters only: say --dead (queued instances "
                         "are not purged by this command)")
    purged = q.purge_dead(root, destination(args.destination))
    print(f"{purged} dead letter(s) of {args.destination} deleted")
    return EXIT_OK


def _reroute(args: argparse.Namespace, config: Config, root: Path) -> int:
    """``queue reroute``: see its --help."""
    from workers.queue import unrouted_files

    _admin(args, "status", config)  # RouterNotRunning (exit 3) when it is not
    listener = next((item for item in config.listen
                     if not item.tls and not item.proxy_protocol), None)
    if listener is None:
        raise UsageError("the router has no listener without TLS or PROXY protocol to "
                         "send the unrouted instances to")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listener.host, listener.host)
    called = config.ae_title if config.ae_titles is None or config.ae_title in \
        config.ae_titles else sorted(config.ae_titles)[0]
    fallback = args.calling_ae or config.ae_title
    batches: list[tuple[str, list[tuple[Path, Part10]]]] = []
    proposed: set[tuple[str, str]] = set()  # (SOP class, syntax) pairs of the last batch
    unreadable = 0
    for path in unrouted_files(root):
        try:
            header = read_part10_header(path)
        except (ProtocolError, OSError) as exc:
            unreadable += 1
            print(f"skipping {path}: {exc}", file=sys.stderr)
            continue
        source = header.meta.get("SourceApplicationEntityTitle") if header.meta else None
        calling = str(source).strip() if source else fallback
        if ae_title_problem(calling) is not None:
            calling = fallback  # a file the router did not write: not ours to trust
        # One association per run of files from one sender, while the contexts fit.
        pairs = {(sop, syntax) for sop, (syntax,) in _store_contexts([header])}
        if not batches or batches[-1][0] != calling or \
                len(proposed | pairs) > MAX_PRESENTATION_CONTEXTS:
            batches.append((calling, []))
            proposed = set()
        proposed |= pairs
        batches[-1][1].append((path, header))
    acknowledged = refused = 0
    for calling, batch in batches:
        handled = 0
        try:
            with connect(host, listener.port, calling_ae=calling, called_ae=called,
                         contexts=_store_contexts(h for _, h in batch),
                         acse_timeout=args.timeout, dimse_timeout=args.timeout) as assoc:
                for path, _ in batch:
                    rsp = assoc.store(path)
                    handled += 1
                    category = dimse.status_category(int(rsp.status))
                    if category in (dimse.StatusCategory.SUCCESS,
                                    dimse.StatusCategory.WARNING):
                        # Held durably by the router again (D4): this copy may go.
                        path.unlink(missing_ok=True)
                        acknowledged += 1
                    else:
                        refused += 1
                        comment = getattr(rsp, "error_comment", None)
                        print(f"{path}: refused, status 0x{int(rsp.status):04X}"
                              + (f" ({comment})" if comment else "") + "; kept",
                              file=sys.stderr)
                assoc.release()
        except (NetworkError, OSError) as exc:
            refused += len(batch) - handled
            print(f"{calling}->{called}@{host}:{listener.port}: {exc}; the instances not "
                  "acknowledged stay in unrouted/", file=sys.stderr)
    left = len(unrouted_files(root))
    print(f"{acknowledged} instance(s) sent through the rules again, {refused} refused, "
          f"{unreadable} unreadable; {left} in unrouted/ now (those that still match no "
          "rule among them)")
    return EXIT_OK if not refused and not unreadable else EXIT_FAILED


def cmd_rules(args: argparse.Namespace) -> int:
    """``rules check|test``: see rules/cli.py."""
    handler = args.handler
    return int(handler(args))


COMMANDS = {"run": cmd_run, "queue": cmd_queue, "rules": cmd_rules, "status": cmd_status,
            "reload": cmd_reload, "scp": cmd_scp, "echo": cmd_echo, "send": cmd_send,
            "find": cmd_find, "move": cmd_move, "get": cmd_get}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    if args.command in ("run", "scp"):
        level = min(level, logging.INFO)
    logline.configure(level, "%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:
        # `queue ls | head`: the reader has what it wanted. As a Unix tool does, end
        # quietly (and keep Python's flush at exit from saying it again).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except ConfigUsageError as exc:
        print(exc, file=sys.stderr)  # already one line naming the file and the key
        return EXIT_USAGE
    except RouterNotRunning as exc:
        print(f"dicom-router {args.command}: {exc}", file=sys.stderr)
        return EXIT_NETWORK
    except UsageError as exc:
        print(f"dicom-router {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except AssociationRejectedError as exc:
        print(f"dicom-router {args.command}: {exc}", file=sys.stderr)
        return EXIT_NETWORK
    except (AssociationAbortedError, NetworkError, OSError) as exc:
        # The peer, for the commands that have one (run's --host/--port are ours).
        where = f"{getattr(args, 'host', None)}:{getattr(args, 'port', None)}: " \
            if getattr(args, "port", None) and args.command not in ("run", "scp") else ""
        print(f"dicom-router {args.command}: {where}{exc}", file=sys.stderr)
        return EXIT_NETWORK
    except ProtocolError as exc:
        print(f"dicom-router {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
