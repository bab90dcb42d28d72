"""router.metrics: ``status --prometheus`` as Prometheus reads it, through
prometheus-client's own parser of the text format (not ours)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from router.metrics import exposition, write_atomically


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _worker(worker_id: int, **figures: Any) -> dict[str, Any]:
    return {"worker_id": worker_id, "pid": 100 + worker_id, "ready": True, "uptime": 5.0,
            "open_associations": 0, "rss": 47_000_000, "cpu_percent": 12.5,
            "served_total": 0, "restarts": 0, "instances_stored": 0, "instances_failed": 0,
            "instances_forwarded": 0, "queued": 0} | figures


RUNNING: dict[str, Any] = {
    "running": True, "pid": 99, "uptime": 3600.5, "generation": 2, "config": "/etc/r.toml",
    "draining": False,
    "workers": [_worker(1, open_associations=3, served_total=120, instances_stored=4000,
                        instances_forwarded=3990, restarts=1),
                _worker(2, ready=False, instances_failed=2)],
    "queues": {"pacs": {"queued": 10, "dead": 2}, 'odd"name\\': {"queued": 0, "dead": 0}},
    "unrouted": 7,
}


def test_a_running_router_in_the_text_format() -> None:
    got = _samples(exposition(RUNNING))
    assert got[("dicom_router_up", ())] == 1
    assert got[("dicom_router_uptime_seconds", ())] == 3600.5
    assert got[("dicom_router_config_generation", ())] == 2
    assert got[("dicom_router_draining", ())] == 0
    one, two = (("worker", "1"),), (("worker", "2"),)
    assert got[("dicom_router_worker_ready", two)] == 0
    assert got[("dicom_router_open_associations", one)] == 3
    # Counters: the parser names their samples with _total, as Prometheus stores them.
    assert got[("dicom_router_associations_total", one)] == 120
    assert got[("dicom_router_instances_stored_total", one)] == 4000
    assert got[("dicom_router_instances_forwarded_total", one)] == 3990
    assert got[("dicom_router_instances_failed_total", two)] == 2
    assert got[("dicom_router_worker_restarts_total", one)] == 1
    assert got[("dicom_router_worker_resident_memory_bytes", one)] == 47_000_000
    assert got[("dicom_router_worker_cpu_percent", one)] == 12.5
    pacs = (("destination", "pacs"),)
    assert got[("dicom_router_queued_instances", pacs)] == 10
    assert got[("dicom_router_dead_letters", pacs)] == 2
    # A label value with a quote and a backslash survives the round trip.
    assert got[("dicom_router_queued_instances", (("destination", 'odd"name\\'),))] == 0
    assert got[("dicom_router_unrouted_instances", ())] == 7
    assert got[("dicom_router_spool_readable", ())] == 1


def test_a_router_that_does_not_answer_is_down_with_its_queues() -> None:
    down = {"running": False, "error": "no router answering",
            "queues": {"pacs": {"queued": 10, "dead": 0}}, "unrouted": 0}
    got = _samples(exposition(down))
    assert got[("dicom_router_up", ())] == 0
    assert got[("dicom_router_queued_instances", (("destination", "pacs"),))] == 10
    assert not [key for key in got if "worker" in key[0] or key[0].endswith("_total")]


def test_an_unreadable_spool_is_said_not_taken_for_empty_queues() -> None:
    got = _samples(exposition({"running": False, "queues_error": "cannot read the spool"}))
    assert got == {("dicom_router_up", ()): 0, ("dicom_router_spool_readable", ()): 0}


def test_the_file_is_replaced_whole(tmp_path: Path) -> None:
    target = tmp_path / "dicom_router.prom"
    target.write_text("old\n")
    write_atomically(target, exposition(RUNNING))
    assert _samples(target.read_text())[("dicom_router_up", ())] == 1
    assert target.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["dicom_router.prom"]
