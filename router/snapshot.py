"""The configuration the supervisor validated, as every worker loads it.

Why not let each worker read ``router.toml`` and its rule files itself: the files
on disk are not the configuration the router runs. An operator edits them, and a
reload is refused when they do not validate -- but they stay on disk, invalid.
A worker started after that (one that crashed, was OOM-killed, or stopped
heartbeating) would read the invalid file and could not start, and a worker that
cannot start stops the router: one crash plus one half-edited file would have
taken the router down. A reload had the same hole in a smaller window: the
supervisor checked the file, then each worker read it again, possibly changed.

So the supervisor reads the configuration file and every rule file once, checks
them, and keeps their texts as a :class:`Snapshot`, written to
``<spool>/run/config-<generation>.msgpack``. Workers -- started, restarted or told
to reload -- parse that file and nothing else, so every worker runs exactly what
the supervisor accepted. Command-line overrides are not in it: each process applies
its own (the supervisor's ``--port`` etc., the workers' ``--spool``).

Other files the configuration names (TLS certificates and keys) are read by each
worker when it starts and when it takes a reload: replacing a certificate takes
effect with a reload, as the rest of the file does.

A reload does not change what only a restart can (the listening sockets, the
number of workers: :func:`~router.config.as_reloaded`): a snapshot after one keeps
the text the router started with, and what it loads keeps those settings from it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgpack

from router.config import Config, as_reloaded, config_from_text, read_config_text
from rules import RuleSet
from rules.load import Problem, compile_texts, read_texts

__all__ = ["Snapshot", "SnapshotError", "prune", "snapshot_path"]

_VERSION: Final = 1
_PREFIX, _SUFFIX = "config-", ".msgpack"


class SnapshotError(Exception):
    """A snapshot file that cannot be read back (missing, truncated, another version)."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The texts of one configuration: the file's (``path`` None: the embedded
    default) and each rule file's, in the order the rules load."""

    path: str | None
    text: str
    rule_texts: tuple[tuple[str, str], ...]
    #: After a reload: the text the router started with (its listeners and worker
    #: count stay those until a restart). None: this is that text.
    startup: str | None = None

    @classmethod
    def read(cls, path: Path | None, *, overrides: Mapping[str, object] | None = None,
             ) -> tuple[Snapshot, Config, RuleSet]:
        """Read the configuration file and its rule files once, and check them.

        Raises :class:`~router.config.ConfigError` or :class:`~rules.RuleError`
        as loading them directly would."""
        text = read_config_text(path)
        config = config_from_text(text, path, overrides=overrides)
        texts, problems = read_texts([config.rules]) if config.rules is not None else ([], [])
        snapshot = cls(None if path is None else str(path), text,
                       tuple((str(p), t) for p, t in texts))
        # Problems reading and compiling in one RuleError, as rules.load_rules does.
        return snapshot, config, snapshot._rules(config, problems)

    def load(self, *, overrides: Mapping[str, object] | None = None,
             ) -> tuple[Config, RuleSet]:
        """The configuration and rules, parsed from the texts alone (no other file
        is read). Raises ConfigError/RuleError only if the code that parses them
        changed since the supervisor checked them."""
        config = self._config(overrides)
        return config, self._rules(config)

    def reloaded(self, running: Snapshot) -> Snapshot:
        """This snapshot as a reload of the one ``running``: it keeps the text the
        router started with."""
        return Snapshot(self.path, self.text, self.rule_texts,
                        running.text if running.startup is None else running.startup)

    def _config(self, overrides: Mapping[str, object] | None) -> Config:
        # The supervisor read the TLS files it names; a worker reads them when it
        # loads the snapshot (a key replaced on disk since must not keep a restarted
        # worker from starting).
        path = None if self.path is None else Path(self.path)
        config = config_from_text(self.text, path, overrides=overrides, check_files=False)
        if self.startup is None:
            return config
        started = config_from_text(self.startup, path, overrides=overrides, check_files=False)
        return as_reloaded(config, started)[0]

    def _rules(self, config: Config, problems: list[Problem] | None = None) -> RuleSet:
        if config.rules is None:
            return RuleSet.empty()
        texts = [(Path(p), t) for p, t in self.rule_texts]
        rules = compile_texts(texts, destinations={d.name for d in config.destinations},
                              problems=problems)
        return RuleSet(rules, [p for p, _ in texts])

    # ------------------------------------------------------------------ files

    def write(self, run_dir: Path, generation: int) -> Path:
        """Write it as generation ``generation`` (atomically: a worker never reads a
        partial one); its path. Not fsync'd: the run folder is rebuilt at start."""
        target = snapshot_path(run_dir, generation)
        partial = target.with_name(target.name + ".part")
        partial.write_bytes(msgpack.packb({
            "version": _VERSION, "path": self.path, "text": self.text,
            "rules": [list(pair) for pair in self.rule_texts], "startup": self.startup}))
        os.replace(partial, target)
        return target

    @classmethod
    def from_file(cls, path: Path) -> Snapshot:
        try:
            data = msgpack.unpackb(path.read_bytes())
            if not isinstance(data, dict) or data.get("version") != _VERSION:
                raise SnapshotError(f"{path}: not a version {_VERSION} configuration snapshot")
            rules = tuple((str(p), str(t)) for p, t in data["rules"])
            source, startup = data["path"], data.get("startup")
            return cls(None if source is None else str(source), str(data["text"]), rules,
                       None if startup is None else str(startup))
        except OSError as exc:
            raise SnapshotError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        except (ValueError, KeyError, TypeError, msgpack.ExtraData) as exc:
            raise SnapshotError(f"{path}: not a configuration snapshot: {exc}") from exc


def snapshot_path(run_dir: Path, generation: int) -> Path:
    return run_dir / f"{_PREFIX}{generation}{_SUFFIX}"


def prune(run_dir: Path, keep: int | None) -> None:
    """Delete snapshots older than generation ``keep`` (None: every one, as at
    start-up), and partial ones: a worker only ever loads the newest, or the one
    before it while a reload is on its way."""
    for entry in run_dir.glob(f"{_PREFIX}*"):
        number = entry.name[len(_PREFIX):].split(".", 1)[0]
        if keep is None or entry.name.endswith(".part") or not number.isdigit() \
                or int(number) < keep:
            entry.unlink(missing_ok=True)

