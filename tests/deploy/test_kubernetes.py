"""deploy/kubernetes: the manifests, read by kubectl offline and checked against the router.

There is no cluster here, and kubectl's validation needs one (``apply``/``create
--dry-run=client`` ask the API server what the kinds are). What works offline is
``kubectl label --local -f DIR -o json``: kubectl's own YAML reader turns every
manifest into JSON, and removing a label no object has (``deploy-test-none-``)
changes nothing else. A YAML error fails it. The objects are then checked here:

- field names, against the Kubernetes API's for the parts these manifests use, since
  nothing else would catch a misspelt field (the API server drops or warns about it);
- the ConfigMap's router.toml and rules.toml load with the router's own loaders, the
  way ``dicom-router run`` loads them from the mounted folder;
- the container's command line and the readiness probe's parse with the router's own
  argparse, and the probe is a C-ECHO the configuration would accept;
- ports agree (configuration, containerPort, probe, both Services), grace periods cover
  the drain, the spool is on a per-pod claim, workers match the CPU request.
"""

from __future__ import annotations

import json
import subprocess
import tomllib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from router.cli import build_parser
from router.config import Config, load_config
from router.snapshot import Snapshot
from tests.deploy.conftest import DEPLOY
from tests.deploy.test_systemd import DRAIN_MARGIN

MANIFESTS = DEPLOY / "kubernetes"
Object = dict[str, Any]

# Fields of the Kubernetes API objects these manifests use (API reference, v1.32).
_KNOWN: Mapping[str, frozenset[str]] = {name: frozenset(fields.split()) for name, fields in {
    "object": "apiVersion kind metadata spec data binaryData immutable",
    "metadata": "name namespace labels annotations",
    "StatefulSetSpec": "minReadySeconds ordinals persistentVolumeClaimRetentionPolicy "
                       "podManagementPolicy replicas revisionHistoryLimit selector "
                       "serviceName template updateStrategy volumeClaimTemplates",
    "PodSpec": "activeDeadlineSeconds affinity automountServiceAccountToken containers "
               "dnsConfig dnsPolicy enableServiceLinks ephemeralContainers hostAliases "
               "hostIPC hostNetwork hostPID hostUsers hostname imagePullSecrets "
               "initContainers nodeName nodeSelector os overhead preemptionPolicy priority "
               "priorityClassName readinessGates resourceClaims resources restartPolicy "
               "runtimeClassName schedulerName schedulingGates securityContext "
               "serviceAccount serviceAccountName setHostnameAsFQDN shareProcessNamespace "
               "subdomain terminationGracePeriodSeconds tolerations "
               "topologySpreadConstraints volumes",
    "PodSecurityContext": "appArmorProfile fsGroup fsGroupChangePolicy runAsGroup "
                          "runAsNonRoot runAsUser seLinuxChangePolicy seLinuxOptions "
                          "seccompProfile supplementalGroups supplementalGroupsPolicy "
                          "sysctls windowsOptions",
    "Container": "args command env envFrom image imagePullPolicy lifecycle livenessProbe "
                 "name ports readinessProbe resizePolicy resources restartPolicy "
                 "securityContext startupProbe stdin stdinOnce terminationMessagePath "
                 "terminationMessagePolicy tty volumeDevices volumeMounts workingDir",
    "SecurityContext": "allowPrivilegeEscalation appArmorProfile capabilities privileged "
                       "procMount readOnlyRootFilesystem runAsGroup runAsNonRoot runAsUser "
                       "seLinuxOptions seccompProfile windowsOptions",
    "Probe": "exec failureThreshold grpc httpGet initialDelaySeconds periodSeconds "
             "successThreshold tcpSocket terminationGracePeriodSeconds timeoutSeconds",
    "Lifecycle": "postStart preStop",
    "LifecycleHandler": "exec httpGet sleep tcpSocket",
    "ResourceRequirements": "claims limits requests",
    "ContainerPort": "containerPort hostIP hostPort name protocol",
    "VolumeMount": "mountPath mountPropagation name readOnly recursiveReadOnly subPath "
                   "subPathExpr",
    "PersistentVolumeClaimSpec": "accessModes dataSource dataSourceRef resources selector "
                                 "storageClassName volumeAttributesClassName volumeMode "
                                 "volumeName",
    "ServiceSpec": "allocateLoadBalancerNodePorts clusterIP clusterIPs externalIPs "
                   "externalName externalTrafficPolicy healthCheckNodePort "
                   "internalTrafficPolicy ipFamilies ipFamilyPolicy loadBalancerClass "
                   "loadBalancerIP loadBalancerSourceRanges ports publishNotReadyAddresses "
                   "selector sessionAffinity sessionAffinityConfig trafficDistribution type",
    "ServicePort": "appProtocol name nodePort port protocol targetPort",
}.items()}


def _fields(kind: str, value: Mapping[str, Any], where: str) -> list[str]:
    return [f"{where}.{key}: not a {kind} field" for key in value if key not in _KNOWN[kind]]


def unknown_fields(obj: Object) -> list[str]:
    """Field names in ``obj`` that its API type does not have (for the parts used here)."""
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    out = _fields("object", obj, name) + _fields("metadata", obj.get("metadata", {}),
                                                 f"{name}.metadata")
    spec = obj.get("spec", {})
    if obj.get("kind") == "Service":
        out += _fields("ServiceSpec", spec, f"{name}.spec")
        for i, port in enumerate(spec.get("ports", [])):
            out += _fields("ServicePort", port, f"{name}.spec.ports[{i}]")
    if obj.get("kind") == "StatefulSet":
        out += _fields("StatefulSetSpec", spec, f"{name}.spec")
        for i, claim in enumerate(spec.get("volumeClaimTemplates", [])):
            out += _fields("PersistentVolumeClaimSpec", claim.get("spec", {}),
                           f"{name}.spec.volumeClaimTemplates[{i}].spec")
        pod = spec.get("template", {}).get("spec", {})
        out += _fields("PodSpec", pod, f"{name}.pod")
        out += _fields("PodSecurityContext", pod.get("securityContext", {}),
                       f"{name}.pod.securityContext")
        for c in pod.get("containers", []):
            at = f"{name}.pod.containers[{c.get('name')}]"
            out += _fields("Container", c, at)
            out += _fields("SecurityContext", c.get("securityContext", {}),
                           f"{at}.securityContext")
            out += _fields("ResourceRequirements", c.get("resources", {}), f"{at}.resources")
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                out += _fields("Probe", c.get(probe, {}), f"{at}.{probe}")
            lifecycle = c.get("lifecycle", {})
            out += _fields("Lifecycle", lifecycle, f"{at}.lifecycle")
            for hook, handler in lifecycle.items():
                out += _fields("LifecycleHandler", handler, f"{at}.lifecycle.{hook}")
            for port in c.get("ports", []):
                out += _fields("ContainerPort", port, f"{at}.ports")
            for mount in c.get("volumeMounts", []):
                out += _fields("VolumeMount", mount, f"{at}.volumeMounts")
    return out


def read_manifests(kubectl: str, path: Path) -> list[Object]:
    """Every object in the YAML files at ``path``, as kubectl reads them."""
    done = subprocess.run([kubectl, "label", "--local", "-f", str(path), "-o", "json",
                           "deploy-test-none-"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, f"kubectl cannot read {path}:\n{done.stderr}"
    # One JSON document per object, one after the other (or a List of them).
    decoder, text, pos = json.JSONDecoder(), done.stdout, 0
    objects: list[Object] = []
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            return objects
        obj, pos = decoder.raw_decode(text, pos)
        objects.extend(obj["items"] if obj.get("kind") == "List" else [obj])


@pytest.fixture(scope="module")
def objects(kubectl: str) -> dict[tuple[str, str], Object]:
    found = read_manifests(kubectl, MANIFESTS)
    index = {(o["kind"], o["metadata"]["name"]): o for o in found}
    assert len(index) == len(found), "two objects of the same kind and name"
    return index


@pytest.fixture(scope="module")
def pod(objects: dict[tuple[str, str], Object]) -> Object:
    spec: Object = objects["StatefulSet", "dicom-router"]["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def container(pod: Object) -> Object:
    (only,) = pod["containers"]
    return only


@pytest.fixture(scope="module")
def config(objects: dict[tuple[str, str], Object], container: Object, pod: Object,
           tmp_path_factory: pytest.TempPathFactory) -> Config:
    """The ConfigMap's router.toml, loaded as the container's command line loads it from
    the mounted ConfigMap (its rules.toml next to it)."""
    args = build_parser().parse_args(container["args"])
    mount = _mount_of(container, pod, configmap="dicom-router")
    assert PurePosixPath(args.config).parent == PurePosixPath(mount["mountPath"])
    folder = tmp_path_factory.mktemp("etc-dicom-router")
    for key, text in objects["ConfigMap", "dicom-router"]["data"].items():
        (folder / key).write_text(text)
    overrides = {"spool": args.spool, "host": args.host, "port": args.port,
                 "workers": args.workers}
    return load_config(folder / args.config.name, overrides=overrides)


def _mount_of(container: Object, pod: Object, *, configmap: str) -> Object:
    names = [v["name"] for v in pod["volumes"] if v.get("configMap", {}).get("name") == configmap]
    assert len(names) == 1, f"one pod volume from ConfigMap {configmap}, found {names}"
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == names[0]]
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
    return mount


def test_kubectl_reads_every_manifest_and_every_field_is_known(
        kubectl: str, objects: dict[tuple[str, str], Object]) -> None:
    assert set(objects) == {("ConfigMap", "dicom-router"), ("StatefulSet", "dicom-router"),
                            ("Service", "dicom-router"), ("Service", "dicom-router-headless")}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        assert read_manifests(kubectl, path), f"{path.name} holds no object"
    problems = [p for obj in objects.values() for p in unknown_fields(obj)]
    assert problems == []


def test_the_field_check_sees_a_misspelt_field() -> None:
    bad = {"kind": "StatefulSet", "metadata": {"name": "x"}, "spec": {"template": {"spec": {
        "terminationGracePeriod": 60, "containers": [{"name": "c", "readinessprobe": {}}]}}}}
    assert unknown_fields(bad) == [
        "StatefulSet/x.pod.terminationGracePeriod: not a PodSpec field",
        "StatefulSet/x.pod.containers[c].readinessprobe: not a Container field"]


def test_configmap_loads_with_the_router_loaders(objects: dict[tuple[str, str], Object],
                                                 config: Config) -> None:
    assert set(objects["ConfigMap", "dicom-router"]["data"]) == {"router.toml", "rules.toml"}
    assert config.rules is not None and config.rules.name == "rules.toml"
    # What `run` reads and checks, refusing to start on a problem (RuleError).
    _, _, rules = Snapshot.read(Path(config.source))
    assert len(rules.rules) >= 1


def test_container_command_is_dicom_router_run(container: Object) -> None:
    assert container["command"] == ["dicom-router"]
    args = build_parser().parse_args(container["args"])
    assert args.command == "run"
    assert args.config == Path("/etc/dicom-router/router.toml")


def test_ports_agree(objects: dict[tuple[str, str], Object], container: Object,
                     config: Config) -> None:
    (listen,) = config.listen
    (port,) = [p for p in container["ports"] if p["name"] == "dicom"]
    assert port["containerPort"] == listen.port
    probe = build_parser().parse_args(container["readinessProbe"]["exec"]["command"][1:])
    assert probe.port == listen.port
    for name in ("dicom-router", "dicom-router-headless"):
        (service_port,) = objects["Service", name]["spec"]["ports"]
        assert service_port["targetPort"] in ("dicom", listen.port), name
        assert service_port["port"] == listen.port, name  # DESIGN D8: 11112 end to end
        assert service_port.get("protocol", "TCP") == "TCP"


def test_readiness_probe_is_a_dicom_echo_the_router_accepts(container: Object,
                                                            config: Config) -> None:
    probe = container["readinessProbe"]
    assert set(probe) - {"exec"} <= {"periodSeconds", "timeoutSeconds", "failureThreshold",
                                     "successThreshold", "initialDelaySeconds"}
    argv = probe["exec"]["command"]
    assert argv[0] == "dicom-router"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "echo" and args.host in ("127.0.0.1", "localhost", "::1")
    assert config.ae_titles is None or args.called_aet in config.ae_titles, (
        f"the probe calls {args.called_aet}, the router answers to {config.ae_titles}")
    assert config.calling_ae_allow is None or args.calling_aet in config.calling_ae_allow
    # The CLI gives up (and says why) before the kubelet kills it.
    assert args.timeout < probe["timeoutSeconds"]
    assert "livenessProbe" not in container  # see the comment in statefulset.yaml


def test_grace_period_covers_pre_stop_and_drain(pod: Object, container: Object,
                                               config: Config) -> None:
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        waited = float(pre_stop["sleep"]["seconds"])
    else:
        argv = pre_stop["exec"]["command"]
        assert argv[0] == "sleep" and len(argv) == 2, argv
        waited = float(argv[1])
    needed = waited + config.drain_grace + DRAIN_MARGIN
    assert pod["terminationGracePeriodSeconds"] > needed, (
        f"terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']}: preStop "
        f"{waited:g} s + drain_grace {config.drain_grace:g} s + {DRAIN_MARGIN:g} s")


def test_each_pod_has_its_own_spool_volume(objects: dict[tuple[str, str], Object], pod: Object,
                                           container: Object, config: Config) -> None:
    claims = {c["metadata"]["name"]: c for c in
              objects["StatefulSet", "dicom-router"]["spec"]["volumeClaimTemplates"]}
    mounts = [m for m in container["volumeMounts"]
              if config.spool.is_relative_to(m["mountPath"])]
    # The deepest mount holding the spool is the one it is written to.
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    assert mount["name"] in claims, f"spool {config.spool} is not on a volumeClaimTemplate"
    assert mount["name"] not in {v["name"] for v in pod.get("volumes", [])}
    assert not mount.get("readOnly", False)
    assert claims[mount["name"]]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert config.admin_socket.is_relative_to(mount["mountPath"])
    security = pod["securityContext"]
    assert security["fsGroup"] == security["runAsUser"] != 0


def test_workers_match_the_cpu_request(objects: dict[tuple[str, str], Object],
                                       container: Object, config: Config) -> None:
    """workers = "auto" would count the node's cores: a CPU request sets no quota."""
    text = objects["ConfigMap", "dicom-router"]["data"]["router.toml"]
    assert isinstance(tomllib.loads(text)["router"]["workers"], int)
    assert config.workers == int(container["resources"]["requests"]["cpu"])


def test_services_select_the_pods_and_keep_client_addresses(
        objects: dict[tuple[str, str], Object]) -> None:
    sts = objects["StatefulSet", "dicom-router"]["spec"]
    labels = sts["template"]["metadata"]["labels"]
    assert sts["selector"]["matchLabels"].items() <= labels.items()
    balancer = objects["Service", "dicom-router"]["spec"]
    assert balancer["type"] == "LoadBalancer"
    # Rules on `peer` need the modality's address: no SNAT on the way in.
    assert balancer["externalTrafficPolicy"] == "Local"
    headless = objects["Service", sts["serviceName"]]["spec"]
    assert headless["clusterIP"] == "None"
    for spec in (balancer, headless):
        assert spec["selector"].items() <= labels.items()
