"""``dicom-router rules check`` and ``dicom-router rules test``.

``check RULES... [--config CFG]``: load the rule files and folders and print
``rules.toml: 5 rules OK`` per file (``5 rules OK (2 query/retrieve)`` when
some route queries and retrievals), or every problem, one per line. Exit 0,
or 2 for bad rules (or an unreadable ``--config``).

``test RULES INSTANCE... --calling-ae AE [--called-ae AE] [--peer IP]
[--at TIME] [--config CFG]``: a dry run. RULES is one rule file or a folder
of them (as ``[routing] rules`` in the configuration); each INSTANCE (a file,
or a folder searched recursively) is evaluated as if received on an
association with those AE titles and peer at that local time, and the output
shows each rule, whether it matched and why, then where the instance would
go with which changes, or that it would be rejected, dropped or unmatched.
Query/retrieve rules are not shown: they take no part in routing instances.
Exit 0; 1 if an instance cannot be read; 2 for bad rules.

With ``--config`` that configuration file is checked as ``run`` checks it, and
the destinations rules forward to (and query or retrieve from) are checked
against its ``[[destination]]`` names; without it they are not, and ``check``
says so.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
from pathlib import Path
from typing import Final

import pydicom

from router.dicom.dataset import readable_by_pydicom
from rules.evaluate import RuleSet
from rules.load import expand
from rules.model import AssociationInfo, RuleError

EXIT_OK: Final = 0
EXIT_UNREADABLE: Final = 1
EXIT_BAD_RULES: Final = 2

_DAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class _ConfigProblem(Exception):
    """The --config file cannot give destination names; the text says why."""


def add_rules_parser(
        subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``rules check`` and ``rules test`` to a ``dicom-router`` sub-command
    set; the handler is :func:`run_rules` (``args.handler``)."""
    rules = subparsers.add_parser(
        "rules", help="check rule files, or dry-run them on instances",
        description="Check routing rule files, or show where instances would go and why.")
    rules.set_defaults(handler=run_rules)
    sub = rules.add_subparsers(dest="rules_command", metavar="SUBCOMMAND", required=True)

    check = sub.add_parser(
        "check", help="validate rule files",
        description="Load rule files and folders (every *.toml inside) and report each "
                    "problem as FILE:LINE: message. Exit 0 if all are valid, 2 if not.")
    check.add_argument("paths", nargs="+", type=Path, metavar="RULES",
                       help="a rule file or a folder of rule files")
    _add_config_arg(check)

    test = sub.add_parser(
        "test", help="dry run: where would these instances go, and why",
        description="Evaluate the rules on each instance as if it were received on an "
                    "association with the given AE titles and peer, at the given local "
                    "time. Prints every rule with whether it matched and why, then the "
                    "decision with the changes per destination. Exit 0; 1 if an instance "
                    "cannot be read; 2 for bad rules.")
    test.add_argument("rules", type=Path, metavar="RULES",
                      help="the rule file, or a folder of rule files")
    test.add_argument("instances", nargs="+", type=Path, metavar="INSTANCE",
                      help="DICOM files, or folders of them (searched recursively)")
    test.add_argument("--calling-ae", required=True, metavar="AE",
                      help="the sending AE title (required)")
    test.add_argument("--called-ae", default="DICOM-ROUTER", metavar="AE",
                      help="the AE title it called (default: %(default)s)")
    test.add_argument("--peer", type=_ip_address, default="127.0.0.1", metavar="IP",
                      help="the sender's IP address (default: %(default)s)")
    test.add_argument("--at", type=_local_time, default=None, metavar="TIME",
                      help='local time for time windows, ISO 8601, e.g. "2026-11-25T14:00" '
                           "(default: now)")
    _add_config_arg(test)
    return rules


def _add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, default=None, metavar="FILE",
                   help="router configuration: check forwards against its [[destination]] "
                        "names (default: destinations are not checked)")


def _local_time(text: str) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'expected a local time as "2026-11-25T14:00", got {text!r}') from None
    return when.astimezone().replace(tzinfo=None) if when.tzinfo is not None else when


def run_rules(args: argparse.Namespace) -> int:
    """Run ``rules check`` or ``rules test``; returns the exit code."""
    try:
        destinations = _destinations(args.config)
    except _ConfigProblem as exc:
        print(f"dicom-router rules: {exc}")
        return EXIT_BAD_RULES
    if args.rules_command == "check":
        return _check(args.paths, destinations, args.config)
    return _test(args, destinations)


def _ip_address(text: str) -> str:
    """--peer: an address, as the router sees its peers (``banana`` or 10.0.0.999
    went through and was "not in 10.0.0.0/8")."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None


def _destinations(config: Path | None) -> frozenset[str] | None:
    """The ``[[destination]]`` names of a configuration file, which is checked as
    ``run`` checks it: deploy/README.md has sites run ``rules check --config`` before
    starting the router, and a file read for its destination names alone passed
    with "[spool] fsnyc" in it, then ``run`` refused it."""
    if config is None:
        return None
    from router.config import ConfigError, load_config  # router.config imports rules

    try:
        loaded = load_config(config)
    except ConfigError as exc:
        raise _ConfigProblem(str(exc)) from None
    except OSError as exc:
        raise _ConfigProblem(f"{config}: cannot read it: {exc.strerror or exc}") from None
    return frozenset(d.name for d in loaded.destinations)


def _check(paths: list[Path], destinations: frozenset[str] | None,
           config: Path | None) -> int:
    try:
        ruleset = RuleSet.load(paths, destinations=destinations)
    except RuleError as exc:
        for problem in exc.problems:
            print(problem)
        n = len(exc.problems)
        print(f"{n} problem{'s' if n > 1 else ''}: the rules cannot be used")
        return EXIT_BAD_RULES
    for path in paths:
        if path.is_dir() and not expand([path])[0]:
            print(f"{path}: no *.toml rule files in this folder")
    for source in ruleset.sources:
        n = sum(1 for r in ruleset.rules if r.file == source)
        qr = sum(1 for r in ruleset.rules if r.file == source and r.routes_queries)
        print(f"{source}: {n} rule{'' if n == 1 else 's'} OK"
              + (f" ({qr} query/retrieve)" if qr else ""))
    if destinations is None:
        print("destination names not checked: give --config to check them")
    else:
        print(f"{config}: OK; destination names checked against it "
              f"({', '.join(sorted(destinations)) or 'no destinations'})")
    return EXIT_OK


def _instances(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        else:
            found.append(path)
    return found


def _test(args: argparse.Namespace, destinations: frozenset[str] | None) -> int:
    try:
        ruleset = RuleSet.load([args.rules], destinations=destinations)
    except RuleError as exc:
        for problem in exc.problems:
            print(problem)
        return EXIT_BAD_RULES
    association = AssociationInfo(calling_ae=args.calling_ae, called_ae=args.called_ae,
                                  peer=args.peer)
    now: dt.datetime = args.at if args.at is not None else dt.datetime.now()
    qr = sum(1 for r in ruleset.rules if r.routes_queries)
    print(f"{len(ruleset)} rule{'' if len(ruleset) == 1 else 's'}"
          + (f" ({qr} query/retrieve, not applied to instances)" if qr else "")
          + " from "
          f"{', '.join(str(s) for s in ruleset.sources) or 'no files'}; calling AE "
          f"{association.calling_ae}, called AE {association.called_ae}, peer "
          f"{association.peer}, at {_DAYS[now.weekday()]} {now:%Y-%m-%d %H:%M:%S}"
          + ("" if destinations is not None else "; destination names not checked"))
    code = EXIT_OK
    for path in _instances(args.instances):
        print()
        try:
            # Pixel Data there, as the router sees it (workers.routing.read_header),
            # but not read unless a rule reads its value.
            dataset = pydicom.dcmread(readable_by_pydicom(path), defer_size=1024)
        except Exception as exc:  # any file at all may be given: report it, go on
            print(f"{path}: cannot read it as DICOM: {exc}")
            code = EXIT_UNREADABLE
            continue
        print(f"{path}: {dataset.get('Modality', '?')} "
              f"{dataset.get('SOPInstanceUID', '(no SOP Instance UID)')}")
        decision, traces = ruleset.explain(association, dataset, now)
        for trace in traces:
            state = "matched" if trace.matched else "did not match"
            if not trace.reached:
                state = f"not reached ({'would match' if trace.matched else 'would not match'})"
            print(f'  rule "{trace.rule}" ({trace.file}:{trace.line}): {state}')
            for reason in trace.reasons:
                print(f"      {reason}")
        print(f"  decision: {decision.describe()}")
        for forward in decision.forwards:
            lines = forward.changes.describe()
            mode = " (transparent)" if forward.transparent else ""
            print(f"    -> {forward.destination}{mode}: "
                  + ("no changes" if not lines else f"{len(lines)} change"
                     + ("s" if len(lines) > 1 else "")))
            for line in lines:
                print(f"         {line}")
            not_made = forward.changes.problem(dataset) if lines else None
            if not_made is not None:
                # What the router does with it (workers/routing.py): never sent without
                # the change.
                print(f"         change not made: {not_made}; the instance would be kept "
                      f"in dead/{forward.destination}, not sent")
    return code
