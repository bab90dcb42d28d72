"""``dicom-router status --prometheus``: the status in Prometheus' text format.

Sites watch a router they run for years with the monitoring they have, most often
Prometheus. The figures are those of ``status --json`` (the supervisor's, over the
admin socket) and the queues counted in the spool, written in the text exposition
format (version 0.0.4) for node_exporter's textfile collector: a timer runs
``status --prometheus FILE`` every minute (deploy/systemd). No HTTP port is opened:
the router listens to nobody it does not have to, and counting a queue of 200,000
files (0.3 s) stays out of the loop that accepts connections.

With the router down, ``dicom_router_up`` is 0 and the queues are still there: what
waits in the spool is what an alert must say then. Counters are per worker slot: a
restarted worker keeps its slot's counts (router/supervisor.py), so they reset only
when the router restarts, as Prometheus' ``rate()`` expects.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

__all__ = ["exposition", "write_atomically"]

# (name, type, help, worker field) of the per-worker figures.
_WORKER: Final = (
    ("dicom_router_open_associations", "gauge", "Associations open now.",
     "open_associations"),
    ("dicom_router_associations_total", "counter", "Associations served.", "served_total"),
    ("dicom_router_instances_stored_total", "counter",
     "Instances received and acknowledged (stored in the spool).", "instances_stored"),
    ("dicom_router_instances_failed_total", "counter",
     "Instances received and refused with a failure status.", "instances_failed"),
    ("dicom_router_instances_forwarded_total", "counter",
     "Instances delivered to a destination.", "instances_forwarded"),
    ("dicom_router_worker_restarts_total", "counter",
     "Times the worker was started again after it died or hung.", "restarts"),
    ("dicom_router_worker_resident_memory_bytes", "gauge",
     "Resident memory of the worker process.", "rss"),
    ("dicom_router_worker_cpu_percent", "gauge",
     "CPU of the worker process between its last two heartbeats, percent of one core.",
     "cpu_percent"),
)


def exposition(result: Mapping[str, Any]) -> str:
    """The text exposition of ``status --json``'s ``result`` (``running`` False, and no
    workers, when no router answered)."""
    out: list[str] = []

    def family(name: str, kind: str, text: str,
               samples: Iterable[tuple[Mapping[str, str], float]]) -> None:
        out.append(f"# HELP {name} {text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            inner = ",".join(f'{k}="{_escaped(v)}"' for k, v in labels.items())
            out.append(f"{name}{{{inner}}} {_number(value)}" if inner
                       else f"{name} {_number(value)}")

    running = bool(result.get("running"))
    family("dicom_router_up", "gauge", "Whether the router answered on its admin socket.",
           [({}, 1 if running else 0)])
    if running:
        family("dicom_router_uptime_seconds", "gauge", "Seconds since the router started.",
               [({}, float(result.get("uptime", 0)))])
        family("dicom_router_config_generation", "gauge",
               "Configuration generation (1 at start, one more per accepted reload).",
               [({}, float(result.get("generation", 0)))])
        family("dicom_router_draining", "gauge", "Whether the router is draining to stop.",
               [({}, 1 if result.get("draining") else 0)])
        workers = list(result.get("workers", []))
        family("dicom_router_worker_ready", "gauge",
               "Whether the worker serves (1) or is starting again (0).",
               [({"worker": str(w["worker_id"])}, 1 if w.get("ready") else 0)
                for w in workers])
        for name, kind, text, field in _WORKER:
            family(name, kind, text, [({"worker": str(w["worker_id"])},
                                       float(w.get(field, 0))) for w in workers])
    queues: Mapping[str, Mapping[str, int]] = result.get("queues", {})
    if "queues_error" not in result:
        family("dicom_router_queued_instances", "gauge",
               "Instances waiting in the spool for delivery to the destination.",
               [({"destination": d}, c["queued"]) for d, c in queues.items()])
        family("dicom_router_dead_letters", "gauge",
               "Instances the destination will not get without `queue retry`.",
               [({"destination": d}, c["dead"]) for d, c in queues.items()])
        if running:  # only the running router knows (none: unknown, not 0)
            failing: Mapping[str, Mapping[str, Any]] = result.get("failing") or {}
            now = time.time()
            family("dicom_router_destination_failing_seconds", "gauge",
                   "Seconds since the destination's first failure after its last delivery "
                   "(0: not failing); its queue keeps what it cannot deliver.",
                   [({"destination": d}, max(0.0, now - float(failing[d]["since"]))
                     if d in failing else 0.0) for d in sorted({*queues, *failing})])
        family("dicom_router_unrouted_instances", "gauge",
               "Instances kept in <spool>/unrouted/ (no rule matched).",
               [({}, float(result.get("unrouted", 0)))])
    family("dicom_router_spool_readable", "gauge",
           "Whether the spool's queues could be counted.",
           [({}, 0 if "queues_error" in result else 1)])
    return "\n".join(out) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` by a rename, as the textfile collector asks: it must
    never read a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # read by node_exporter, another user
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _escaped(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
