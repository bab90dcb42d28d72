"""The queues on disk (workers/queue.py) and `dicom-router queue`, with the router
stopped: what an operator's command may touch, and records that are not the router's.
Found by an outside campaign against the failure records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from workers.queue import (
    dead_letters,
    failure_record,
    failure_records,
    known_destinations,
    retry_dead,
)


def _spool(tmp_path: Path) -> tuple[Path, Path]:
    """A spool with, for "pacs" and "ai", one queued instance (with a failure record)
    and one dead letter (with its reason); and a configuration naming both."""
    root = tmp_path / "spool"
    for dest in ("pacs", "ai"):
        dead, queue = root / "dead" / dest, root / "queue" / dest
        dead.mkdir(parents=True)
        queue.mkdir(parents=True)
        (dead / f"dead-{dest}.dcm").write_bytes(b"dead")
        (dead / f"dead-{dest}.json").write_text('{"reason": "refused", "attempts": 3}')
        (queue / f"queued-{dest}.dcm").write_bytes(b"acknowledged, waiting")
        (queue / f"queued-{dest}.json").write_text('{"failures": 1, "first": 1}')
    config = tmp_path / "router.toml"
    config.write_text(f'[spool]\npath = "{root}"\n' + "".join(
        f'[[destination]]\nname = "{d}"\nhost = "127.0.0.1"\nport = 104\nae_title = "X"\n'
        for d in ("pacs", "ai")))
    return root, config


def _queue_cmd(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "router.cli", "queue", *args,
                           "--config", str(config)],
                          capture_output=True, text=True, timeout=60)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("args", [
    ["purge", "", "--dead"],                  # used to purge every destination's
    ["purge", "../queue/pacs", "--dead"],     # used to delete instances still queued
    ["purge", "nosuch", "--dead"],            # used to say "0 deleted", exit 0
    ["retry", "../queue/ai"],                 # used to delete the queue's failure records
    ["ls", "nosuch"],
])
def test_a_destination_that_is_not_one_touches_nothing(tmp_path: Path,
                                                       args: list[str]) -> None:
    _, config = _spool(tmp_path)
    outside = tmp_path / "archive"
    outside.mkdir()
    (outside / "study.dcm").write_bytes(b"somebody's")
    before = _files(tmp_path)
    done = _queue_cmd(config, *args)
    assert done.returncode == 2, done
    assert "no destination named" in done.stderr and "known here: pacs, ai" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert _files(tmp_path) == before


def test_a_path_outside_the_spool_is_not_a_destination(tmp_path: Path) -> None:
    _, config = _spool(tmp_path)
    outside = tmp_path / "archive"
    outside.mkdir()
    (outside / "study.dcm").write_bytes(b"somebody's")
    done = _queue_cmd(config, "purge", str(outside), "--dead")
    assert done.returncode == 2, done
    assert (outside / "study.dcm").exists()


def test_retry_takes_a_dead_letter_as_queue_ls_names_it(tmp_path: Path) -> None:
    root, config = _spool(tmp_path)
    done = _queue_cmd(config, "retry", "pacs/dead-pacs.dcm")
    assert done.returncode == 0, done
    assert "1 instance(s) moved back" in done.stdout
    assert (root / "queue" / "pacs" / "dead-pacs.dcm").exists()
    assert (root / "dead" / "ai" / "dead-ai.dcm").exists()


def test_retry_leaves_an_unconfigured_destinations_dead_letters(tmp_path: Path) -> None:
    """`queue retry pacs` after pacs left the configuration moved its dead letters to a
    queue nobody serves, said they would go out when the router starts, and the
    dead-letter count (an alert) fell to 0 (an outside operations campaign)."""
    root, config = _spool(tmp_path)
    config.write_text(config.read_text().split('[[destination]]\nname = "ai"')[0])
    done = _queue_cmd(config, "retry", "ai")
    assert done.returncode == 1, done
    assert "kept 1 dead letter(s) of ai: it is not configured" in done.stderr, done
    assert (root / "dead" / "ai" / "dead-ai.dcm").exists()
    done = _queue_cmd(config, "retry")  # all: the configured one's go back
    assert done.returncode == 0 and "1 instance(s) moved back" in done.stdout, done
    assert (root / "queue" / "pacs" / "dead-pacs.dcm").exists()
    assert (root / "dead" / "ai" / "dead-ai.dcm").exists()
    assert "kept 1 dead letter(s) of ai" in done.stderr, done
    # Nothing else left to send: exit 1 as the README says, for all as for DEST or ID
    # (all and ID said 0, an outside campaign).
    for more in ([], ["dead-ai.dcm"], ["ai/dead-ai.dcm"]):
        done = _queue_cmd(config, "retry", *more)
        assert done.returncode == 1, (more, done)
        assert "0 instance(s) moved back" not in done.stdout, done


def test_a_spool_that_is_not_there_is_said_so(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "router.cli", "queue", "ls", "--spool",
                           str(tmp_path / "typo")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no spool at" in done.stderr, done
    # status, the router down: it counted empty queues there, and the spool readable.
    for fmt, said in (([], f"queues: no spool at {tmp_path / 'typo'}"),
                      (["--prometheus", "-"], "dicom_router_spool_readable 0")):
        done = subprocess.run([sys.executable, "-m", "router.cli", "status", "--spool",
                               str(tmp_path / "typo"), *fmt], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 3 and said in done.stdout, done
    # A folder that is there but holds no spool listed nothing, and exit 0.
    (tmp_path / "home").mkdir()
    done = subprocess.run([sys.executable, "-m", "router.cli", "queue", "ls", "--spool",
                           str(tmp_path / "home")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "is not a router spool" in done.stderr, done
    # The spool of a router that has queued nothing yet is one (a nightly retry).
    (tmp_path / "fresh" / "incoming").mkdir(parents=True)
    (tmp_path / "fresh" / "tmp").mkdir()
    for args in (["ls"], ["retry"]):
        done = subprocess.run([sys.executable, "-m", "router.cli", "queue", *args, "--spool",
                               str(tmp_path / "fresh")], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done


@pytest.mark.parametrize("target", ["/etc/passwd", "pacs/", "pacs/../../x.dcm"])
def test_a_path_given_to_retry_is_said_to_be_one(tmp_path: Path, target: str) -> None:
    """`queue retry /etc/passwd` answered "no destination named ''"."""
    root, config = _spool(tmp_path)
    before = _files(root)
    done = _queue_cmd(config, "retry", target)
    assert done.returncode == 2 and "not a path" in done.stderr, done
    assert len(done.stderr.strip().splitlines()) == 1
    assert _files(root) == before


def test_retry_keeps_a_superseded_letter_unless_told(tmp_path: Path) -> None:
    """A letter a newer version superseded was sent again by `queue retry`, after the
    newer one had been delivered: the destination ended with the old version."""
    root, config = _spool(tmp_path)
    (root / "dead" / "pacs" / "old.dcm").write_bytes(b"v1")
    (root / "dead" / "pacs" / "old.json").write_text(json.dumps(
        {"reason": "0110H; superseded by new.dcm", "superseded_by": "new.dcm"}))
    done = _queue_cmd(config, "retry", "pacs")
    assert done.returncode == 0, done
    assert "1 instance(s) moved back" in done.stdout  # dead-pacs.dcm
    assert "kept pacs/old.dcm: superseded by new.dcm" in done.stdout
    assert (root / "dead" / "pacs" / "old.dcm").exists()
    letters = json.loads(_queue_cmd(config, "ls", "pacs", "--json").stdout)
    assert letters["destinations"][0]["dead_letters"][0]["superseded_by"] == "new.dcm"
    done = _queue_cmd(config, "retry", "pacs/old.dcm")  # named: kept all the same
    assert done.returncode == 0 and "kept pacs/old.dcm" in done.stdout, done
    done = _queue_cmd(config, "retry", "pacs/old.dcm", "--superseded")
    assert done.returncode == 0 and "1 instance(s) moved back" in done.stdout, done
    assert (root / "queue" / "pacs" / "old.dcm").exists()


@pytest.mark.parametrize("reason", [
    '{"attempts": "three"}', "null", "[1]", '{"time": "yesterday"}', '{"attempts": 1e999}',
    '{"time": NaN}', '{"status": true, "attempts": -4}', "{not json",
])
def test_a_dead_letter_reason_that_is_not_the_routers_spoils_nothing(
        tmp_path: Path, reason: str) -> None:
    """One odd reason file made `queue ls`, `retry` and `purge` fail with a
    traceback for every dead letter, and NaN made `ls --json` print invalid JSON."""
    root, config = _spool(tmp_path)
    (root / "dead" / "pacs" / "odd.dcm").write_bytes(b"odd")
    (root / "dead" / "pacs" / "odd.json").write_text(reason)
    listed = _queue_cmd(config, "ls", "--json")
    assert listed.returncode == 0, listed
    letters = {d["name"]: d for dest in json.loads(listed.stdout)["destinations"]
               for d in dest["dead_letters"]}
    assert set(letters) == {"dead-pacs.dcm", "odd.dcm", "dead-ai.dcm"}
    assert letters["odd.dcm"]["attempts"] == 0 and letters["odd.dcm"]["status"] is None
    assert _queue_cmd(config, "ls").returncode == 0
    assert _queue_cmd(config, "retry", "pacs").returncode == 0
    assert sorted(p.name for p in (root / "queue" / "pacs").glob("*.dcm")) == [
        "dead-pacs.dcm", "odd.dcm", "queued-pacs.dcm"]


def test_a_retried_dead_letter_does_not_inherit_a_failure_record(tmp_path: Path) -> None:
    """A crash between the move to dead/ and the removal of the queue's record left
    the record behind; `queue retry` put the instance back beside it, with its old
    attempts: one try, then dead again."""
    root, _ = _spool(tmp_path)
    (root / "queue" / "pacs" / "dead-pacs.json").write_text(
        '{"failures": 19, "first": 1000, "reason": "0110H"}')
    assert retry_dead(root, "pacs").moved == 1
    assert (root / "queue" / "pacs" / "dead-pacs.dcm").exists()
    assert failure_record(root, "pacs", "dead-pacs.dcm") is None


@pytest.mark.parametrize("record", [
    '{"failures": 2, "first": -1e999}', '{"failures": 2, "first": NaN}',
    '{"failures": 2, "first": ' + "9" * 400 + "}", '{"failures": 2, "first": 1e300}',
    '{"failures": true, "first": 5}', '{"failures": 2, "first": 5, "failing": Infinity}',
    '{"failures": 2, "first": 5, "not_before": -3}',
])
def test_a_failure_record_with_numbers_out_of_range_is_ignored(tmp_path: Path,
                                                               record: str) -> None:
    """-Infinity made the give-up line raise (a traceback, the sender restarted and the
    instance never tried again), a 400-digit integer raised OverflowError, NaN made
    give_up_after never fire."""
    root, _ = _spool(tmp_path)
    (root / "queue" / "pacs" / "queued-pacs.json").write_text(record)
    assert failure_record(root, "pacs", "queued-pacs.dcm") is None


def test_records_left_half_written_or_without_instance_are_removed(tmp_path: Path) -> None:
    root, _ = _spool(tmp_path)
    queue = root / "queue" / "pacs"
    (queue / ".queued-pacs.json.tmp").write_text('{"failu')
    os.utime(queue / ".queued-pacs.json.tmp", (1, 1))  # left by a worker killed long ago
    (queue / ".other.json.tmp").write_text('{"failu')  # another worker writes it now
    (queue / "gone.json").write_text('{"failures": 1, "first": 1}')
    assert failure_records(root, "pacs") == {"queued-pacs.dcm"}
    assert sorted(p.name for p in queue.iterdir()) == [
        ".other.json.tmp", "queued-pacs.dcm", "queued-pacs.json"]


def test_a_folder_no_destination_could_have_is_left_out(tmp_path: Path) -> None:
    """`queue ls --json` ended in a traceback on a folder put in dead/ by hand."""
    root, config = _spool(tmp_path)
    (root / "dead" / "old pacs").mkdir()
    (root / "dead" / "old pacs" / "x.dcm").write_bytes(b"x")
    listed = _queue_cmd(config, "ls", "--json")
    assert listed.returncode == 0, listed
    assert [d["destination"] for d in json.loads(listed.stdout)["destinations"]] == [
        "pacs", "ai"]


def test_the_empty_folders_a_removed_destination_leaves_are_not_listed(
        tmp_path: Path) -> None:
    """A destination removed or renamed by the configuration leaves queue/<name>/ (and
    dead/<name>/) behind, empty; status, queue ls and the Prometheus export listed it
    for good. Listed while it holds something, marked not configured; a configured
    one is listed empty too."""
    root, config = _spool(tmp_path)
    for top in ("queue", "dead"):
        (root / top / "gone").mkdir()
    (root / "queue" / "waiting").mkdir()
    (root / "queue" / "waiting" / "x.dcm").write_bytes(b"x")
    assert known_destinations(root, ["pacs", "quiet"]) == ["pacs", "quiet", "ai", "waiting"]
    listed = _queue_cmd(config, "ls")
    assert "\nwaiting " in listed.stdout and "(not configured)" in listed.stdout, listed
    assert "gone" not in listed.stdout, listed


def test_dead_letters_of_a_name_that_is_a_path_are_refused(tmp_path: Path) -> None:
    root, _ = _spool(tmp_path)
    with pytest.raises(ValueError, match="not a destination name"):
        list(dead_letters(root, "../queue/pacs"))


def test_queue_ls_dest_lists_that_destination_only(tmp_path: Path) -> None:
    """`queue ls pacs --json` printed every destination with its dead letters (an
    outside campaign); the text listing printed every destination's line too."""
    _, config = _spool(tmp_path)
    listed = _queue_cmd(config, "ls", "pacs", "--json")
    assert listed.returncode == 0, listed
    assert [d["destination"] for d in json.loads(listed.stdout)["destinations"]] == ["pacs"]
    text = _queue_cmd(config, "ls", "pacs").stdout
    assert "\npacs " in text and "\nai " not in text and "dead-ai" not in text


def test_queue_ls_into_head_ends_quietly(tmp_path: Path) -> None:
    """`queue ls | head` said "[Errno 32] Broken pipe" and exited 1 (an outside
    campaign); a Unix tool whose reader has had enough ends quietly."""
    (tmp_path / "queue" / "pacs").mkdir(parents=True)
    reader, writer = os.pipe()
    os.close(reader)  # as head does after its lines: here before the first one
    proc = subprocess.Popen([sys.executable, "-m", "router.cli", "queue", "ls", "--spool",
                             str(tmp_path)], stdout=writer, stderr=subprocess.PIPE)
    os.close(writer)
    assert proc.stderr is not None
    assert proc.wait(60) == 0
    assert proc.stderr.read() == b""
