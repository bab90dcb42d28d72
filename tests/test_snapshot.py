"""router/snapshot.py: the configuration the supervisor checked, as workers load it."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from router.config import EMBEDDED_SOURCE, ConfigError
from router.snapshot import Snapshot, SnapshotError, prune, snapshot_path
from rules import RuleError

CONFIG = '''[router]
ae_title = "SNAP"
[routing]
rules = "rules.d"
[[destination]]
name = "pacs"
host = "127.0.0.1"
port = 104
ae_title = "PACS"
'''
RULE_A = '[[rule]]\nname = "a"\n[rule.when]\nModality = "CT"\n[rule.then]\nforward = ["pacs"]\n'
RULE_B = '[[rule]]\nname = "b"\n[rule.then]\ndrop = true\n'


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "rules.d").mkdir()
    (tmp_path / "rules.d" / "10-a.toml").write_text(RULE_A)
    (tmp_path / "rules.d" / "20-b.toml").write_text(RULE_B)
    config = tmp_path / "router.toml"
    config.write_text(CONFIG)
    return config


def test_workers_load_the_texts_read_once_not_the_files(files: Path, tmp_path: Path) -> None:
    snapshot, config, rules = Snapshot.read(files, overrides={"spool": tmp_path / "s"})
    assert config.ae_title == "SNAP" and [r.name for r in rules.rules] == ["a", "b"]
    written = snapshot.write(tmp_path, 7)
    assert written == snapshot_path(tmp_path, 7)
    # The files change, even into invalid ones, or disappear: the snapshot does not.
    files.write_text("[router]\nbogus = 1\n")
    (tmp_path / "rules.d" / "10-a.toml").write_text("[[rule]]\nnot toml")
    (tmp_path / "rules.d" / "20-b.toml").unlink()
    loaded, loaded_rules = Snapshot.from_file(written).load(overrides={"spool": tmp_path / "w"})
    assert loaded.ae_title == "SNAP" and loaded.spool == tmp_path / "w"
    assert [r.name for r in loaded_rules.rules] == ["a", "b"]
    assert loaded_rules.sources == (tmp_path / "rules.d" / "10-a.toml",
                                    tmp_path / "rules.d" / "20-b.toml")
    # Relative paths still resolve against the configuration file's folder.
    assert loaded.rules == tmp_path / "rules.d"
    assert loaded.source == str(files)


def test_the_embedded_default(tmp_path: Path) -> None:
    snapshot, config, rules = Snapshot.read(None, overrides={"spool": tmp_path})
    assert snapshot.path is None and not rules.rules
    loaded, _ = Snapshot.from_file(snapshot.write(tmp_path, 1)).load(
        overrides={"spool": tmp_path})
    assert loaded == config and loaded.source == EMBEDDED_SOURCE


def test_problems_are_those_of_loading_the_files(files: Path, tmp_path: Path) -> None:
    (tmp_path / "rules.d" / "10-a.toml").write_bytes(b"\xff\xfe")
    (tmp_path / "rules.d" / "20-b.toml").write_text(RULE_B.replace("drop = true",
                                                                   'forward = ["nowhere"]'))
    with pytest.raises(RuleError) as raised:
        Snapshot.read(files)
    # Every problem at once, reading and compiling alike, each naming its file.
    text = str(raised.value)
    assert "10-a.toml" in text and "not UTF-8" in text
    assert "20-b.toml" in text and "nowhere" in text
    files.write_text("[router]\nbogus = 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        Snapshot.read(files)
    with pytest.raises(ConfigError, match="cannot read"):
        Snapshot.read(tmp_path / "missing.toml")


@pytest.mark.parametrize("content", [
    b"", b"\x00garbage", msgpack.packb([1, 2]), msgpack.packb({"version": 99}),
    msgpack.packb({"version": 1, "path": None}), msgpack.packb({"version": 1}) + b"x",
])
def test_a_damaged_snapshot_is_one_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "config-1.msgpack"
    path.write_bytes(content)
    with pytest.raises(SnapshotError, match=r"config-1\.msgpack"):
        Snapshot.from_file(path)
    with pytest.raises(SnapshotError, match="cannot read"):
        Snapshot.from_file(tmp_path / "config-2.msgpack")


def test_prune_keeps_the_generations_asked_for(tmp_path: Path) -> None:
    snapshot = Snapshot(None, "", ())
    for generation in (1, 2, 3, 4):
        snapshot.write(tmp_path, generation)
    (tmp_path / "config-5.msgpack.part").write_bytes(b"")
    (tmp_path / "other").write_bytes(b"")
    prune(tmp_path, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config-3.msgpack", "config-4.msgpack", "other"]
    prune(tmp_path, keep=None)
    assert [p.name for p in tmp_path.iterdir()] == ["other"]


def test_a_reload_keeps_the_listeners_and_workers_the_router_started_with(
        files: Path, tmp_path: Path) -> None:
    """What only a restart changes stays as started, in every process that loads a
    snapshot after a reload, a worker restarted later too: a moved port's socket kept
    no listener (plain connections served on a PROXY port), and a new worker count
    divided max_associations and concurrency at once (an outside campaign)."""
    started = CONFIG.replace('[router]\nae_title = "SNAP"\n', '[router]\nae_title = "SNAP"\n'
                             'workers = 2\n[[router.listen]]\nport = 11112\n'
                             'proxy_protocol = true\nproxy_from = ["10.0.0.5"]\n'
                             '[[router.listen]]\nport = 11113\n')
    files.write_text(started)
    running, config, _ = Snapshot.read(files, overrides={"spool": tmp_path / "s"})
    files.write_text(started.replace("workers = 2", "workers = 1")
                     .replace("port = 11112", "port = 11114")
                     .replace("port = 11113", "port = 11113\n[logging]\nlevel = \"WARNING\""))
    new, _, _ = Snapshot.read(files, overrides={"spool": tmp_path / "s"})
    loaded, _ = Snapshot.from_file(new.reloaded(running).write(tmp_path, 2)).load(
        overrides={"spool": tmp_path / "w"})
    assert loaded.workers == 2 and loaded.log_level == "WARNING"  # the rest is new
    assert [(s.port, s.proxy_protocol) for s in loaded.listen] == [(11112, True), (11113, False)]
    assert loaded.listen == config.listen
    # A later reload still starts from what the router started with.
    again = new.reloaded(new.reloaded(running))
    assert again.startup == running.text
    # Settings of a listener whose address and kind stay apply at once.
    files.write_text(started.replace('"10.0.0.5"', '"10.0.0.6"'))
    moved, _, _ = Snapshot.read(files, overrides={"spool": tmp_path / "s"})
    after, _ = moved.reloaded(running).load(overrides={"spool": tmp_path / "w"})
    assert [str(n) for n in after.listen[0].proxy_from] == ["10.0.0.6/32"]
