"""deploy/container/Containerfile, read rather than built (no container engine here, so
CI does not build the image: deploy/README.md says so).

What reading can prove: the files it copies exist and are what pyproject.toml packages;
its default command parses with the router's argparse and runs on the embedded default
configuration with the spool inside the declared VOLUME; the user, port and volume are
the ones deploy/kubernetes/statefulset.yaml relies on.
"""

from __future__ import annotations

import json
import shlex
import tomllib
from pathlib import Path, PurePosixPath

from router.cli import build_parser
from router.config import DEFAULT_PORT, load_config
from tests.deploy.conftest import DEPLOY
from tests.deploy.test_kubernetes import MANIFESTS, read_manifests

CONTAINERFILE = DEPLOY / "container" / "Containerfile"
REPO = DEPLOY.parent


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in CONTAINERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def arguments(name: str) -> list[str]:
    found = [rest for word, rest in instructions() if word == name]
    assert len(found) == 1, f"{name} appears {len(found)} times"
    return found[0].split()


def exec_form(name: str) -> list[str]:
    """ENTRYPOINT/CMD in JSON form (a shell form would put sh in front: not PID 1)."""
    found = [rest for word, rest in instructions() if word == name]
    assert len(found) == 1, f"{name} appears {len(found)} times"
    value = json.loads(found[0])
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), found[0]
    return value


def test_base_image_and_unprivileged_user() -> None:
    assert arguments("FROM") == ["python:3.11-slim"]
    (user,) = arguments("USER")
    assert user.isdigit() and int(user) != 0
    runs = " ".join(rest for word, rest in instructions() if word == "RUN")
    assert f"--uid {user}" in runs


def test_copies_what_pyproject_packages() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    copied: set[str] = set()
    for word, rest in instructions():
        if word == "COPY":
            *sources, _ = shlex.split(rest)
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
                copied.add(source.rstrip("/"))
    assert {"pyproject.toml", pyproject["project"]["readme"]} <= copied
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in copied, f"package {pattern} is not copied"
    runs = [rest for word, rest in instructions() if word == "RUN"]
    assert any("pip install ." in r for r in runs)


def test_default_command_runs_the_router_with_the_spool_in_the_volume(tmp_path: Path) -> None:
    assert exec_form("ENTRYPOINT") == ["dicom-router"]
    args = build_parser().parse_args(exec_form("CMD"))
    assert args.command == "run" and args.config is None
    volumes = [PurePosixPath(v) for v in json.loads(" ".join(arguments("VOLUME")))]
    assert any(PurePosixPath(args.spool).is_relative_to(v) for v in volumes), (
        f"--spool {args.spool} is outside the VOLUME {volumes}: the queue would be lost")
    config = load_config(None, overrides={"spool": args.spool})  # the embedded default
    assert [listen.port for listen in config.listen] == [DEFAULT_PORT]
    assert arguments("EXPOSE") == [f"{DEFAULT_PORT}"]


def test_matches_the_statefulset(kubectl: str) -> None:
    (sts,) = [o for o in read_manifests(kubectl, MANIFESTS / "statefulset.yaml")
              if o["kind"] == "StatefulSet"]
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsUser"] == int(arguments("USER")[0])
    assert [p["containerPort"] for p in container["ports"]] == [int(arguments("EXPOSE")[0])]
    volumes = json.loads(" ".join(arguments("VOLUME")))
    claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    on_claims = {m["mountPath"] for m in container["volumeMounts"] if m["name"] in claims}
    assert set(volumes) <= on_claims, "the image's VOLUME is not on a per-pod claim"
