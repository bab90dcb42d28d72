"""router.config: the embedded default, a full file, every refusal, overrides, paths, policy.

Error cases are one table: the TOML text, and the exact one-line message the
operator sees (file, line, key, what is expected). The policy tests feed
``Config.to_acceptor_policy()`` to the real ``negotiate()`` with requests built
by ``build_request``, so "accepted as configured" means what the router does.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest

import router.config as config_module
from router.config import (
    EMBEDDED_DEFAULT,
    EMBEDDED_SOURCE,
    MAX_WORKERS,
    Config,
    ConfigError,
    Listen,
    cgroup_cpu_limit,
    config_from_text,
    default_spool_dir,
    default_workers,
    load_config,
    parse_config,
)
from router.dicom import uids
from router.dicom.negotiation import build_request, negotiate
from router.dicom.pdu import (
    AAssociateAC,
    AAssociateRJ,
    MaximumLength,
    PresentationContextResult,
    RejectReason,
    RejectSource,
)

CT = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
MR = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
US_RETIRED = "1.2.840.10008.5.1.4.1.1.6"  # Ultrasound Image Storage (Retired)
FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Q/R FIND
PRIVATE_SOP = "1.2.840.113619.4.26"  # a vendor's private storage class
IVLE = uids.IMPLICIT_VR_LITTLE_ENDIAN
EVLE = uids.EXPLICIT_VR_LITTLE_ENDIAN
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def parse(text: str, **kwargs: object) -> Config:
    return parse_config(textwrap.dedent(text), "router.toml", **kwargs)  # type: ignore[arg-type]


def error_of(text: str, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(text, **kwargs)
    return str(caught.value)


# ---------------------------------------------------------------------------
# Embedded default
# ---------------------------------------------------------------------------


def test_embedded_default_values() -> None:
    config = load_config(None)
    spool = default_spool_dir()
    assert config == Config(
        ae_title="DICOM-ROUTER",
        ae_titles=frozenset({"DICOM-ROUTER"}),
        calling_ae_allow=None,
        listen=(Listen(host="0.0.0.0", port=11112, tls=False),),
        workers=default_workers(),
        spool=spool,
        admin_socket=spool / "run" / "admin.sock",
        sop_classes=None,
        transfer_syntaxes=None,
        max_pdu=1_048_576,
        artim_timeout=30.0,
        idle_timeout=600.0,
        drain_grace=30.0,
        heartbeat_interval=1.0,
        heartbeat_timeout=10.0,
        fsync=True,
        log_level="INFO",
        source=EMBEDDED_SOURCE,
    )
    assert config.is_embedded_default
    assert config.describe().startswith(
        "embedded default config: AE title DICOM-ROUTER on 0.0.0.0:11112, "
    )


def test_embedded_default_text_is_the_default_and_so_is_an_empty_file() -> None:
    assert parse_config(EMBEDDED_DEFAULT, EMBEDDED_SOURCE) == load_config(None)
    empty = parse_config("", "empty.toml")
    assert empty == dataclasses.replace(load_config(None), source="empty.toml")
    assert not empty.is_embedded_default


def test_docstring_example_parses() -> None:
    # The schema in the module docstring is what operators copy: keep it valid.
    doc = config_module.__doc__ or ""
    example = doc.split("an empty file is the embedded default::\n", 1)[1]
    example = example.split("\nDecisions worth knowing", 1)[0]
    # Its files (rules.d) are examples: the schema is checked, not their existence.
    config = parse_config(textwrap.dedent(example), "doc.toml", check_files=False)
    assert config.ae_titles == frozenset({"DICOM-ROUTER", "ARCHIVE"})
    assert config.sop_classes == frozenset({CT, MR})
    assert config.admin_socket == Path("/run/dicom-router/admin.sock")


@pytest.mark.parametrize(
    ("environ", "euid", "expected"),
    [
        ({"XDG_DATA_HOME": "/data", "HOME": "/home/u"}, 0, "/var/spool/dicom-router"),
        ({"XDG_DATA_HOME": "/data", "HOME": "/home/u"}, 1000, "/data/dicom-router/spool"),
        ({"HOME": "/home/u"}, 1000, "/home/u/.local/share/dicom-router/spool"),
        # The XDG spec: a relative XDG_DATA_HOME is invalid and ignored.
        ({"XDG_DATA_HOME": "data", "HOME": "/home/u"}, 1000,
         "/home/u/.local/share/dicom-router/spool"),
    ],
)
def test_default_spool_dir(environ: dict[str, str], euid: int, expected: str) -> None:
    assert default_spool_dir(environ=environ, euid=euid) == Path(expected)


# ---------------------------------------------------------------------------
# A full file
# ---------------------------------------------------------------------------

FULL = """\
# Radiology department router
[router]
ae_title = "RAD-ROUTER"
workers = 3

[[router.listen]]
host = "0.0.0.0"
port = 104

[[router.listen]]
host = "::1"
port = 11112

[acceptance]
called_ae = ["RAD-ROUTER", "OLD PACS"]
calling_ae = ["CT1", "MR1"]
sop_classes = [
    "CTImageStorage",
    "1.2.840.10008.5.1.4.1.1.4",
    "1.2.840.113619.4.26",
    "CTImageStorage",
]
transfer_syntaxes = ["JPEG2000Lossless", "1.2.840.10008.1.2.1"]
max_pdu = 16777216

[spool]
path = "spool"
fsync = false

[timeouts]
artim = 10
idle = 0
drain_grace = 0
heartbeat_interval = 0.5
heartbeat_timeout = 5

[admin]
socket = "/run/dicom-router/admin.sock"

[logging]
level = "debug"
"""


def test_full_file(tmp_path: Path) -> None:
    path = tmp_path / "router.toml"
    path.write_text(FULL)
    config = load_config(path)
    assert config == Config(
        ae_title="RAD-ROUTER",
        ae_titles=frozenset({"RAD-ROUTER", "OLD PACS"}),
        calling_ae_allow=frozenset({"CT1", "MR1"}),
        listen=(Listen(host="0.0.0.0", port=104), Listen(host="::1", port=11112)),
        workers=3,
        spool=tmp_path / "spool",
        admin_socket=Path("/run/dicom-router/admin.sock"),
        sop_classes=frozenset({CT, MR, PRIVATE_SOP}),
        transfer_syntaxes=(J2K_LOSSLESS, EVLE),
        max_pdu=16 << 20,
        artim_timeout=10.0,
        idle_timeout=None,  # 0 = never
        drain_grace=0.0,
        heartbeat_interval=0.5,
        heartbeat_timeout=5.0,
        fsync=False,
        log_level="DEBUG",
        source=str(path),
    )
    assert config.describe() == (
        f"config {path}: AE title RAD-ROUTER on 0.0.0.0:104, [::1]:11112, 3 workers, "
        f"spool {tmp_path / 'spool'}"
    )


def test_a_tls_server_name_in_its_absolute_form_is_the_same_name() -> None:
    """"pacs.example.org." failed every host name check: certificates never carry
    the root's dot."""
    config = config_from_text(
        '[[destination]]\nname = "a"\nhost = "10.1.2.3"\nport = 104\nae_title = "PACS"\n'
        'tls = true\ntls_server_name = "pacs.example.org."\n', None)
    assert config.destinations[0].tls_server_name == "pacs.example.org"


def test_keywords_for_any() -> None:
    config = parse(
        """\
        [acceptance]
        called_ae = "any"
        calling_ae = "any"
        sop_classes = "storage"
        transfer_syntaxes = "any"
        """
    )
    assert config.ae_titles is None
    assert config.calling_ae_allow is None
    assert config.sop_classes is None
    assert config.transfer_syntaxes is None


# ---------------------------------------------------------------------------
# Refusals: one line each, naming file, line, key and what is expected
# ---------------------------------------------------------------------------

ROUTER_TABLES = ("(known tables: [router], [acceptance], [spool], [timeouts], [admin], "
                 "[logging], [routing], [destination])")

ERRORS = [
    # -- unknown tables and keys, with suggestions
    pytest.param(
        "[routr]\nworkers = 2\n",
        f"router.toml:1: [routr]: unknown table; did you mean [router]? {ROUTER_TABLES}",
        id="unknown-table-suggestion",
    ),
    pytest.param(
        "[destinations]\n",
        f"router.toml:1: [destinations]: unknown table; did you mean [destination]? "
        f"{ROUTER_TABLES}",
        id="unknown-table-plural",
    ),
    pytest.param(
        "[queues]\n",
        f"router.toml:1: [queues]: unknown table {ROUTER_TABLES}",
        id="unknown-table",
    ),
    # -- destinations and routing
    pytest.param(
        '[[destination]]\nname = "pacs"\nport = 104\nae_title = "PACS"\n',
        'router.toml:1: [[destination]] #1: "host" is missing (name, host, port and ae_title '
        "are required)",
        id="destination-missing-host",
    ),
    pytest.param(
        '[[destination]]\nname = "../x"\nhost = "h"\nport = 104\nae_title = "PACS"\n',
        "router.toml:2: [[destination]] #1 name: expected a name of 1 to 64 letters, digits, "
        "'-', '_' or '.', not starting with '.' or '-', got \"../x\"",
        id="destination-name-path",
    ),
    pytest.param(
        '[[destination]]\nname = "a"\nhost = "h"\nport = 104\nae_title = "PACS"\n'
        '[[destination]]\nname = "a"\nhost = "h"\nport = 105\nae_title = "PACS"\n',
        'router.toml:7: [[destination]] #2 name: a destination named "a" is already defined',
        id="destination-duplicate",
    ),
    pytest.param(
        '[[destination]]\nname = "a"\nhost = "h"\nport = 104\nae_title = "PACS"\n'
        "concurrency = 0\n",
        "router.toml:6: [[destination]] #1 concurrency: expected an integer from 1 to 64, got 0",
        id="destination-concurrency",
    ),
    pytest.param(
        '[[destination]]\nname = "a"\nhost = "h"\nport = 104\nae_title = "PACS"\n'
        'tls_ca = "ca.pem"\n',
        "router.toml:6: [[destination]] #1 tls_ca: tls_ca is set but tls is false",
        id="destination-tls-ca-without-tls",
    ),
    pytest.param(
        '[[destination]]\nname = "a"\nhost = "h"\nport = 104\nae_title = "PACS"\n'
        'tls_server_name = "pacs.example.org"\n',
        "router.toml:6: [[destination]] #1 tls_server_name: tls_server_name is set but tls "
        "is false",
        id="destination-server-name-without-tls",
    ),
    pytest.param(
        '[[destination]]\nname = "a"\nhost = "h"\nport = 104\nae_title = "PACS"\n'
        'tls = true\ntls_cert = "router.pem"\n',
        "router.toml:7: [[destination]] #1 tls_cert: tls_key is missing: a client "
        "certificate needs tls_cert and tls_key (PEM files)",
        id="destination-client-certificate-without-key",
    ),
    pytest.param(
        '[[destination]]\nname = "a"\nhost = "h"\nport = 104\nae_title = "PACS"\n'
        "tls = true\ntls_check_hostname = false\n",
        "router.toml:7: [[destination]] #1 tls_check_hostname: tls_check_hostname = false "
        "needs tls_ca: without a host name to check, a certificate any public CA issued to "
        "anybody would be accepted",
        id="destination-no-hostname-check-without-ca",
    ),
    pytest.param(
        '[[destination]]\nname = "a"\nhost = "h"\nport = 104\nae_title = "PACS"\n'
        'tls = true\ntls_ca = "ca.pem"\ntls_check_hostname = false\n'
        'tls_server_name = "pacs"\n',
        "router.toml:9: [[destination]] #1 tls_server_name: tls_server_name is the host name "
        "to check, but tls_check_hostname is false",
        id="destination-server-name-unchecked",
    ),
    pytest.param(
        '[[destination]]\nname = "a"\nhost = "h"\nport = 104\nae_title = "PACS"\n'
        'tls = true\ntls_server_name = "pacs example"\n',
        "router.toml:7: [[destination]] #1 tls_server_name: expected a host name or IP "
        'address, got "pacs example"',
        id="destination-server-name-blank",
    ),
    pytest.param(
        '[[destination]]\nname = "a"\nhost = "h"\nport = 104\nae_title = "PACS"\n'
        'tls = true\ntls_server_name = "pacs..example.org"\n',
        "router.toml:7: [[destination]] #1 tls_server_name: expected a host name or IP "
        'address, got "pacs..example.org" (an empty label, or one longer than 63 characters)',
        id="destination-server-name-empty-label",
    ),
    pytest.param(
        '[[destination]]\nname = "a"\nhost = "pacs..example.org"\nport = 104\n'
        'ae_title = "PACS"\n',
        "router.toml:3: [[destination]] #1 host: expected a host name or IP "
        'address, got "pacs..example.org" (an empty label, or one longer than 63 characters)',
        id="destination-host-empty-label",
    ),
    pytest.param(
        '[[destination]]\nname = "a"\nhost = "h"\nport = 104\nae_title = "PACS"\n'
        "retry = { initial = 10, max = 5 }\n",
        "router.toml:6: [[destination]] #1 retry: max: expected at least initial (10.0), "
        "got 5.0",
        id="destination-retry-max-below-initial",
    ),
    pytest.param(
        '[[destination]]\nname = "a"\nhost = "h"\nport = 104\nae_title = "PACS"\n'
        "retry = { give_up_after = 0 }\n",
        "router.toml:6: [[destination]] #1 retry: give_up_after: expected a number of seconds "
        "> 0, got 0",
        id="destination-retry-give-up-after-zero",
    ),
    pytest.param(
        '[[destination]]\nname = "a"\nhost = "h"\nport = 104\nae_title = "PACS"\n'
        'move_mode = "via"\n',
        'router.toml:6: [[destination]] #1 move_mode: expected "direct" or "proxy", got "via"',
        id="destination-move-mode",
    ),
    pytest.param(
        "[router]\nmax_associations = 0\n",
        "router.toml:2: [router] max_associations: expected an integer from 1 to 1000000, "
        "got 0",
        id="router-max-associations",
    ),
    pytest.param(
        '[routing]\nunmatched = "drop"\n',
        'router.toml:2: [routing] unmatched: expected "keep" or "reject", got "drop"',
        id="routing-unmatched",
    ),
    pytest.param(
        "workers = 2\n[router]\n",
        f"router.toml:1: workers: unknown top-level key; it belongs in [router] {ROUTER_TABLES}",
        id="top-level-key-belongs-elsewhere",
    ),
    pytest.param(
        "[router]\nae_title = \"X\"\nwokers = 2\n",
        'router.toml:3: [router] wokers: unknown key; did you mean "workers"? '
        "(known keys: ae_title, workers, max_associations, listen)",
        id="unknown-key-suggestion",
    ),
    pytest.param(
        "[router]\nport = 104\n",
        "router.toml:2: [router] port: unknown key; it belongs in [[router.listen]] "
        "(known keys: ae_title, workers, max_associations, listen)",
        id="key-in-wrong-table",
    ),
    pytest.param(
        "[[router.listen]]\nport = 104\n[[router.listen]]\nprot = 105\n",
        'router.toml:4: [[router.listen]] #2 prot: unknown key; did you mean "port"? '
        "(known keys: host, port, tls, tls_cert, tls_key, tls_ca, proxy_protocol, proxy_from)",
        id="unknown-key-in-array-table",
    ),
    pytest.param(
        "[spool]\ncompression = true\n",
        "router.toml:2: [spool] compression: unknown key (known keys: path, fsync)",
        id="unknown-key-no-suggestion",
    ),
    pytest.param(
        "router = 5\n",
        "router.toml:1: router: expected a table [router], got 5",
        id="table-not-a-table",
    ),
    # -- wrong types: TOML is typed and nothing is converted
    pytest.param(
        '[router]\nworkers = "two"\n',
        'router.toml:2: [router] workers: expected an integer from 1 to 256 or "auto", got "two"',
        id="int-got-string",
    ),
    pytest.param(
        "[router]\nworkers = true\n",
        'router.toml:2: [router] workers: expected an integer from 1 to 256 or "auto", got true',
        id="int-got-bool",
    ),
    pytest.param(
        "[router]\nworkers = 2.0\n",
        'router.toml:2: [router] workers: expected an integer from 1 to 256 or "auto", got 2.0',
        id="int-got-float",
    ),
    pytest.param(
        '[[router.listen]]\nport = "104"\n',
        'router.toml:2: [[router.listen]] #1 port: expected an integer from 1 to 65535, got "104"',
        id="port-got-string",
    ),
    pytest.param(
        "[[router.listen]]\nhost = 127\n",
        "router.toml:2: [[router.listen]] #1 host: expected a string, got 127",
        id="string-got-int",
    ),
    pytest.param(
        '[spool]\nfsync = "yes"\n',
        'router.toml:2: [spool] fsync: expected true or false, got "yes"',
        id="bool-got-string",
    ),
    pytest.param(
        "[spool]\nfsync = 1\n",
        "router.toml:2: [spool] fsync: expected true or false, got 1",
        id="bool-got-int",
    ),
    pytest.param(
        '[timeouts]\nartim = "30s"\n',
        'router.toml:2: [timeouts] artim: expected a number of seconds > 0, got "30s"',
        id="seconds-got-string",
    ),
    pytest.param(
        "[timeouts]\nidle = false\n",
        "router.toml:2: [timeouts] idle: expected a number of seconds >= 0, got false",
        id="seconds-got-bool",
    ),
    pytest.param(
        "[spool]\npath = 5\n",
        "router.toml:2: [spool] path: expected a path (a string), got 5",
        id="path-got-int",
    ),
    pytest.param(
        '[spool]\npath = ""\n',
        'router.toml:2: [spool] path: expected a path, got ""',
        id="path-empty",
    ),
    pytest.param(
        "[logging]\nlevel = 10\n",
        "router.toml:2: [logging] level: expected a string, got 10",
        id="level-got-int",
    ),
    pytest.param(
        '[acceptance]\ncalling_ae = "CT1"\n',
        'router.toml:2: [acceptance] calling_ae: expected "any" or an array of AE titles, '
        'got "CT1"',
        id="ae-list-got-string",
    ),
    pytest.param(
        "[acceptance]\ncalled_ae = []\n",
        'router.toml:2: [acceptance] called_ae: expected "any" or an array of AE titles, '
        "got an empty array",
        id="ae-list-empty",
    ),
    pytest.param(
        "[acceptance]\nsop_classes = 1\n",
        'router.toml:2: [acceptance] sop_classes: expected "storage" or an array of SOP class '
        "UIDs or keywords, got 1",
        id="uid-list-got-int",
    ),
    pytest.param(
        '[acceptance]\ntransfer_syntaxes = ["ExplicitVRLittleEndian", 2]\n',
        'router.toml:2: [acceptance] transfer_syntaxes: expected "any" or an array of transfer '
        "syntax UIDs or keywords, got an item 2",
        id="uid-list-got-int-item",
    ),
    pytest.param(
        "[router]\nlisten = { port = 104 }\n",
        "router.toml:2: [router] listen: expected [[router.listen]] tables, got a table",
        id="listen-inline-table",
    ),
    pytest.param(
        "[router.listen]\nport = 104\n",
        "router.toml:1: [router] listen: expected [[router.listen]] tables, got a table",
        id="listen-single-table",
    ),
    pytest.param(
        "[router]\nlisten = []\n",
        "router.toml:2: [router] listen: expected at least one [[router.listen]] table, got none",
        id="listen-empty",
    ),
    # -- out of range
    pytest.param(
        "[router]\nworkers = 0\n",
        'router.toml:2: [router] workers: expected an integer from 1 to 256 or "auto", got 0',
        id="workers-zero",
    ),
    pytest.param(
        "[router]\nworkers = 1000\n",
        'router.toml:2: [router] workers: expected an integer from 1 to 256 or "auto", got 1000',
        id="workers-too-many",
    ),
    pytest.param(
        "[[router.listen]]\nport = 0\n",
        "router.toml:2: [[router.listen]] #1 port: expected an integer from 1 to 65535, got 0",
        id="port-zero",
    ),
    pytest.param(
        "[[router.listen]]\nport = 70000\n",
        "router.toml:2: [[router.listen]] #1 port: expected an integer from 1 to 65535, got 70000",
        id="port-too-big",
    ),
    pytest.param(
        '[[router.listen]]\nhost = ""\n',
        'router.toml:2: [[router.listen]] #1 host: expected a host name or IP address, got ""',
        id="host-empty",
    ),
    pytest.param(
        "[acceptance]\nmax_pdu = 1000\n",
        "router.toml:2: [acceptance] max_pdu: expected an integer from 4096 to 16777216, "
        "got 1000",
        id="max-pdu-small",
    ),
    pytest.param(
        "[acceptance]\nmax_pdu = 16777217\n",
        "router.toml:2: [acceptance] max_pdu: expected an integer from 4096 to 16777216, "
        "got 16777217",
        id="max-pdu-big",
    ),
    pytest.param(
        # A PDU is held whole as it arrives: "no limit" let one peer fill the memory.
        "[acceptance]\nmax_pdu = 0\n",
        "router.toml:2: [acceptance] max_pdu: expected an integer from 4096 to 16777216 "
        "(0, no limit, would let a peer send a whole instance as one PDU, held in memory), "
        "got 0",
        id="max-pdu-unlimited",
    ),
    pytest.param(
        "[timeouts]\nartim = 0\n",
        "router.toml:2: [timeouts] artim: expected a number of seconds > 0, got 0",
        id="artim-zero",
    ),
    pytest.param(
        "[timeouts]\ndrain_grace = -1\n",
        "router.toml:2: [timeouts] drain_grace: expected a number of seconds >= 0, got -1",
        id="drain-negative",
    ),
    pytest.param(
        "[timeouts]\nheartbeat_interval = inf\n",
        "router.toml:2: [timeouts] heartbeat_interval: expected a number of seconds > 0, got inf",
        id="seconds-inf",
    ),
    pytest.param(
        "[timeouts]\nheartbeat_interval = 5\nheartbeat_timeout = 5\n",
        "router.toml:3: [timeouts] heartbeat_timeout: expected more than heartbeat_interval "
        "(5.0), got 5.0",
        id="heartbeat-timeout-not-above-interval",
    ),
    pytest.param(
        '[logging]\nlevel = "LOUD"\n',
        'router.toml:2: [logging] level: expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL, '
        'got "LOUD"',
        id="level-unknown",
    ),
    pytest.param(
        "[[router.listen]]\ntls = true\n",
        "router.toml:2: [[router.listen]] #1 tls: tls = true needs tls_cert (a PEM file)",
        id="tls-without-certificate",
    ),
    pytest.param(
        '[[router.listen]]\ntls = true\ntls_cert = "c.pem"\n',
        "router.toml:2: [[router.listen]] #1 tls: tls = true needs tls_key (a PEM file)",
        id="tls-without-key",
    ),
    pytest.param(
        '[[router.listen]]\ntls_cert = "c.pem"\n',
        "router.toml:2: [[router.listen]] #1 tls_cert: tls_cert is set but tls is false",
        id="tls-cert-without-tls",
    ),
    pytest.param(
        '[[router.listen]]\ntls = true\ntls_cert = "/nonexistent/c.pem"\ntls_key = "k.pem"\n',
        "router.toml:3: [[router.listen]] #1 tls_cert: cannot read /nonexistent/c.pem: "
        "No such file or directory",
        id="tls-cert-missing",
    ),
    # -- AE titles
    pytest.param(
        '[router]\nae_title = "A-VERY-LONG-AE-TITLE"\n',
        'router.toml:2: [router] ae_title: expected an AE title of 1 to 16 characters, '
        'got "A-VERY-LONG-AE-TITLE"',
        id="ae-too-long",
    ),
    pytest.param(
        '[router]\nae_title = ""\n',
        'router.toml:2: [router] ae_title: expected an AE title of 1 to 16 characters, got ""',
        id="ae-empty",
    ),
    pytest.param(
        '[router]\nae_title = "   "\n',
        'router.toml:2: [router] ae_title: expected an AE title of 1 to 16 characters, got "   "',
        id="ae-blank",
    ),
    pytest.param(
        "[router]\nae_title = 7\n",
        "router.toml:2: [router] ae_title: expected an AE title (a string), got 7",
        id="ae-not-string",
    ),
    pytest.param(
        '[acceptance]\ncalling_ae = ["CT1", " MR1"]\n',
        'router.toml:2: [acceptance] calling_ae: AE title " MR1" has leading or trailing '
        "spaces, which DICOM ignores",
        id="ae-padded",
    ),
    pytest.param(
        "[acceptance]\ncalling_ae = [\n  \"CT1\",\n  'CT\\2',\n]\n",
        'router.toml:4: [acceptance] calling_ae: AE title "CT\\\\2" may not contain a '
        "backslash, control or non-ASCII characters",
        id="ae-backslash-on-its-own-line",
    ),
    pytest.param(
        '[acceptance]\ncalled_ae = ["ROUTER\\t"]\n',
        'router.toml:2: [acceptance] called_ae: AE title "ROUTER\\t" may not contain a '
        "backslash, control or non-ASCII characters",
        id="ae-control-char",
    ),
    pytest.param(
        '[acceptance]\ncalled_ae = ["RÖNTGEN"]\n',
        'router.toml:2: [acceptance] called_ae: AE title "R\\u00d6NTGEN" may not contain a '
        "backslash, control or non-ASCII characters",
        id="ae-non-ascii",
    ),
    # -- UIDs and keywords
    pytest.param(
        "[acceptance]\nsop_classes = [\n  \"CTImageStorage\",\n  \"CTImageStorag\",\n]\n",
        'router.toml:4: [acceptance] sop_classes: unknown SOP class "CTImageStorag"; '
        'did you mean "CTImageStorage"?',
        id="keyword-typo",
    ),
    pytest.param(
        '[acceptance]\nsop_classes = ["CT Image Storage"]\n',
        'router.toml:2: [acceptance] sop_classes: unknown SOP class "CT Image Storage"; '
        'did you mean "CTImageStorage"?',
        id="keyword-as-name",
    ),
    pytest.param(
        '[acceptance]\nsop_classes = ["Holography"]\n',
        'router.toml:2: [acceptance] sop_classes: unknown SOP class "Holography"',
        id="keyword-unknown",
    ),
    pytest.param(
        '[acceptance]\nsop_classes = ["1.2.840..10008"]\n',
        'router.toml:2: [acceptance] sop_classes: "1.2.840..10008" is not a UID (digits and '
        "dots, at most 64 characters)",
        id="uid-malformed",
    ),
    pytest.param(
        f'[acceptance]\nsop_classes = ["1.{"2" * 64}"]\n',
        f'router.toml:2: [acceptance] sop_classes: "1.{"2" * 64}" is not a UID (digits and '
        "dots, at most 64 characters)",
        id="uid-too-long",
    ),
    pytest.param(
        '[acceptance]\nsop_classes = ["1.2.840.10008.1.2.1"]\n',
        "router.toml:2: [acceptance] sop_classes: 1.2.840.10008.1.2.1 is a transfer syntax UID, "
        "not a SOP class",
        id="uid-wrong-kind",
    ),
    pytest.param(
        '[acceptance]\ntransfer_syntaxes = ["CTImageStorage"]\n',
        'router.toml:2: [acceptance] transfer_syntaxes: "CTImageStorage" is a SOP class, '
        "not a transfer syntax",
        id="keyword-wrong-kind",
    ),
    pytest.param(
        '[acceptance]\ntransfer_syntaxes = ["JPEG2000Losless"]\n',
        'router.toml:2: [acceptance] transfer_syntaxes: unknown transfer syntax '
        '"JPEG2000Losless"; did you mean "JPEG2000Lossless"?',
        id="ts-keyword-typo",
    ),
    # -- duplicates
    pytest.param(
        "[[router.listen]]\nport = 104\n\n[[router.listen]]\nhost = \"0.0.0.0\"\nport = 104\n",
        "router.toml:4: [[router.listen]] #2: 0.0.0.0:104 is already listed as #1",
        id="duplicate-listen",
    ),
    # Bound at start, the second failed "Address already in use", exit 1 for ever.
    pytest.param(
        '[[router.listen]]\nhost = "127.0.0.1"\nport = 104\n'
        '[[router.listen]]\nhost = "0.0.0.0"\nport = 104\n',
        "router.toml:5: [[router.listen]] #2 host: 0.0.0.0:104 and listener #1, "
        "127.0.0.1:104, overlap: 0.0.0.0 is every address of this machine on port 104; "
        "give the port to one of them",
        id="listen-overlaps-wildcard",
    ),
    pytest.param(
        '[[router.listen]]\nhost = "::"\nport = 104\n'
        '[[router.listen]]\nhost = "10.0.0.5"\nport = 104\n',
        "router.toml:5: [[router.listen]] #2 host: 10.0.0.5:104 and listener #1, [::]:104, "
        "overlap: :: is every address of this machine on port 104; give the port to one "
        "of them",
        id="listen-overlaps-ipv6-wildcard",
    ),
    pytest.param(
        '[[router.listen]]\nhost = "127.0.0.1"\nport = 104\nproxy_protocol = true\n'
        '[[router.listen]]\nhost = "127.0.0.2"\nport = 104\n',
        "router.toml:5: [[router.listen]] #2: listener #1 on port 104 has proxy_protocol = "
        "true: listeners sharing a port must agree on proxy_protocol",
        id="listen-proxy-disagrees",
    ),
    pytest.param(
        '[[router.listen]]\nhost = "127.0.0.1"\nport = 104\nproxy_protocol = true\n'
        'proxy_from = ["10.0.0.1", "10.1.0.0/16"]\n'
        '[[router.listen]]\nhost = "127.0.0.2"\nport = 104\nproxy_protocol = true\n',
        "router.toml:6: [[router.listen]] #2: listener #1 on port 104 has proxy_from = "
        "[10.0.0.1/32, 10.1.0.0/16]: listeners sharing a port must agree on proxy_from",
        id="listen-proxy-from-disagrees",
    ),
    # -- PROXY protocol
    pytest.param(
        '[[router.listen]]\nport = 104\nproxy_from = ["10.0.0.1"]\n',
        "router.toml:3: [[router.listen]] #1 proxy_from: proxy_from is set but proxy_protocol "
        "is false",
        id="proxy-from-without-proxy",
    ),
    pytest.param(
        '[[router.listen]]\nport = 104\nproxy_protocol = true\nproxy_from = ["10.0.0.1/8"]\n',
        "router.toml:4: [[router.listen]] #1 proxy_from: 10.0.0.1/8 has host bits set "
        "(the network is 10.0.0.0/8)",
        id="proxy-from-host-bits",
    ),
    pytest.param(
        '[[router.listen]]\nport = 104\nproxy_protocol = true\nproxy_from = ["haproxy1"]\n',
        "router.toml:4: [[router.listen]] #1 proxy_from: 'haproxy1' does not appear to be an "
        "IPv4 or IPv6 network",
        id="proxy-from-name",
    ),
    pytest.param(
        '[[router.listen]]\nport = 104\nproxy_protocol = true\nproxy_from = "10.0.0.1"\n',
        "router.toml:4: [[router.listen]] #1 proxy_from: expected a non-empty list of IP "
        'addresses or networks (CIDR, strings), got "10.0.0.1"',
        id="proxy-from-not-a-list",
    ),
    pytest.param(
        '[[router.listen]]\nport = 104\nproxy_protocol = "v2"\n',
        'router.toml:3: [[router.listen]] #1 proxy_protocol: expected true or false, got "v2"',
        id="proxy-protocol-not-bool",
    ),
    # -- TOML syntax: tomllib's own position is kept
    pytest.param(
        "[router]\nworkers = 2\nae_title = DICOM\n",
        "router.toml:3: invalid TOML: Invalid value (at line 3, column 12)",
        id="toml-syntax",
    ),
    pytest.param(
        "[router]\nworkers = 2\nworkers = 3\n",
        "router.toml:3: invalid TOML: Cannot overwrite a value (at line 3, column 12)",
        id="toml-duplicate-key",
    ),
    # A RecursionError in tomllib (an outside campaign): a traceback at start, and the
    # end of the supervisor on reload.
    pytest.param(
        "[router]\nworkers = " + "[" * 2000 + "]" * 2000 + "\n",
        "router.toml: invalid TOML: tables or arrays nested too deeply",
        id="toml-nested-too-deep",
    ),
]


@pytest.mark.parametrize(("text", "message"), ERRORS)
def test_refused_with_one_line(text: str, message: str) -> None:
    assert error_of(text) == message
    assert "\n" not in message


def test_error_carries_its_parts_and_pickles() -> None:
    with pytest.raises(ConfigError) as caught:
        parse("[router]\nworkers = 0\n")
    error = caught.value
    assert (error.file, error.key, error.line) == ("router.toml", "[router] workers", 2)
    assert error.message.startswith("expected an integer")
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error)
    assert copy.line == 2


def test_error_without_a_findable_line() -> None:
    # Dotted keys are not followed by the line scan; the message is complete anyway.
    assert error_of("router.workers = 0\n") == (
        'router.toml: [router] workers: expected an integer from 1 to 256 or "auto", got 0'
    )


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing)
    assert str(caught.value) == f"{missing}: cannot read: No such file or directory"

    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'[router]\nae_title = "R\xd6NTGEN"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(latin1)
    assert str(caught.value) == f"{latin1}:2: not UTF-8 text (TOML files are UTF-8)"


def test_byte_order_mark_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "bom.toml"
    path.write_bytes(b'\xef\xbb\xbf[router]\nworkers = 2\n')
    assert load_config(path).workers == 2


def test_file_given_as_relative_path_is_named_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "router.toml").write_text('[router]\nworkers = "two"\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_config(Path("router.toml"))
    assert str(caught.value) == (
        'router.toml:2: [router] workers: expected an integer from 1 to 256 or "auto", got "two"'
    )


# ---------------------------------------------------------------------------
# Overrides (command-line flags) and paths
# ---------------------------------------------------------------------------


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "router.toml"
    path.write_text(FULL)
    config = load_config(path, overrides={"workers": 1, "spool": tmp_path / "elsewhere"})
    assert config.listen == load_config(path).listen
    assert config.workers == 1
    assert config.spool == tmp_path / "elsewhere"
    # [admin] socket is explicit in FULL, so it does not follow the spool.
    assert config.admin_socket == Path("/run/dicom-router/admin.sock")

    # FULL has two listeners: --host or --port would not say which one they move
    # (test_a_listen_flag_with_several_listeners_is_refused). With one, they move it.
    one = tmp_path / "one.toml"
    one.write_text('[[router.listen]]\nhost = "0.0.0.0"\nport = 104\n')
    config = load_config(one, overrides={"host": "127.0.0.1"})
    assert config.listen == (Listen(host="127.0.0.1", port=104),)
    config = load_config(one, overrides={"port": 4242})
    assert config.listen == (Listen(host="0.0.0.0", port=4242),)


def test_overrides_on_the_embedded_default(tmp_path: Path) -> None:
    config = load_config(
        None,
        overrides={"host": "127.0.0.1", "port": 5104, "spool": str(tmp_path), "workers": "auto"},
    )
    assert config.listen == (Listen(host="127.0.0.1", port=5104),)
    assert config.spool == tmp_path
    # `status` given the same flags derives the same socket.
    assert config.admin_socket == tmp_path / "run" / "admin.sock"
    assert config.workers == default_workers()
    assert config.is_embedded_default


def test_none_overrides_are_ignored() -> None:
    overrides = {"port": None, "host": None, "workers": None, "spool": None}
    assert load_config(None, overrides=overrides) == load_config(None)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"port": 0}, "command line: --port: expected an integer from 1 to 65535, got 0"),
        ({"port": True}, "command line: --port: expected an integer from 1 to 65535, got true"),
        ({"workers": 300},
         'command line: --workers: expected an integer from 1 to 256 or "auto", got 300'),
        ({"host": ""}, 'command line: --host: expected a host name or IP address, got ""'),
        ({"spool": ""}, "command line: --spool: expected a directory, got ''"),
    ],
)
def test_bad_overrides(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides=overrides)
    assert str(caught.value) == message


@pytest.mark.parametrize("flag", [{"port": 4242}, {"host": "127.0.0.1"}])
def test_a_listen_flag_with_several_listeners_is_refused(flag: dict[str, object]) -> None:
    """--port replaced every listener by the first one, moved: the TLS listener beside
    it was gone without a word (an outside campaign). Which one should it move?"""
    text = """
        [[router.listen]]
        port = 11112
        [[router.listen]]
        port = 2762
        tls = true
        tls_cert = "router.pem"
        tls_key = "router.key"
    """
    assert error_of(text, overrides=flag, check_files=False) == (
        f"command line: --{next(iter(flag))}: the configuration has 2 listeners "
        "([[router.listen]]); --host and --port apply to one: change them in the file")
    # One listener: the flag moves it and keeps the rest of it.
    one = parse("[[router.listen]]\nport = 2762\nproxy_protocol = true\n",
                overrides={"port": 4242})
    assert [(listen.port, listen.proxy_protocol) for listen in one.listen] == [(4242, True)]


def test_file_is_checked_even_where_a_flag_wins() -> None:
    # Otherwise the error would only appear the day the flag is dropped.
    assert error_of("[router]\nworkers = 0\n", overrides={"workers": 2}) == (
        'router.toml:2: [router] workers: expected an integer from 1 to 256 or "auto", got 0'
    )


def test_unknown_override_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown overrides"):
        load_config(None, overrides={"prot": 1})


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    path = folder / "router.toml"
    path.write_text('[spool]\npath = "../var/spool"\n')
    monkeypatch.chdir(tmp_path)  # not where the file is: must not matter
    config = load_config(Path("etc/router.toml"))
    assert config.spool == folder / "../var/spool"
    assert config.admin_socket == folder / "../var/spool/run/admin.sock"

    path.write_text('[admin]\nsocket = "admin.sock"\n')
    assert load_config(path).admin_socket == folder / "admin.sock"


def test_spool_flag_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None, overrides={"spool": "spool"})
    assert config.spool == tmp_path / "spool"


def test_home_is_expanded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse('[spool]\npath = "~/spool"\n').spool == tmp_path / "spool"


def test_admin_socket_path_too_long(tmp_path: Path) -> None:
    deep = "/srv/" + "d" * 100
    message = error_of(f'[spool]\npath = "{deep}"\n')
    assert message == (
        f"router.toml: [admin] socket: the default {deep}/run/admin.sock is 120 bytes long, "
        "more than the 107 a Unix socket path allows; set [admin] socket to a shorter path"
    )
    message = error_of(f'[admin]\nsocket = "{deep}.sock"\n')
    assert message == (
        f'router.toml:2: [admin] socket: "{deep}.sock" is 110 bytes long, more than the 107 a '
        "Unix socket path allows; set [admin] socket to a shorter path"
    )


# ---------------------------------------------------------------------------
# Config built in code
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"workers": 0}, "workers"),
        ({"ae_title": "X" * 17}, "ae_title"),
        ({"ae_titles": frozenset()}, "ae_titles"),
        ({"calling_ae_allow": frozenset({"A\\B"})}, "calling_ae_allow"),
        ({"listen": ()}, "listen"),
        ({"listen": (Listen(port=104), Listen(port=104))}, "listen"),
        ({"max_pdu": 10}, "max_pdu"),
        ({"idle_timeout": 0.0}, "idle_timeout"),
        ({"heartbeat_timeout": 0.5}, "heartbeat_timeout"),
        ({"log_level": "debug"}, "log_level"),
        ({"sop_classes": frozenset({"CTImageStorage"})}, "sop_classes"),
        ({"spool": Path("relative")}, "spool"),
    ],
)
def test_config_checks_itself(change: dict[str, object], field: str) -> None:
    base = load_config(None)
    with pytest.raises(ValueError, match=rf"^Config\.{field}: "):
        dataclasses.replace(base, **change)  # type: ignore[arg-type]


def test_listen_allows_an_ephemeral_port_for_tests() -> None:
    assert Listen(host="127.0.0.1", port=0).port == 0
    with pytest.raises(ValueError, match=r"^Listen\.port"):
        Listen(port=65536)


# ---------------------------------------------------------------------------
# Acceptance policy, through the real negotiate()
# ---------------------------------------------------------------------------


def associate(
    config: Config,
    contexts: Sequence[tuple[str, Sequence[str]]],
    *,
    calling: str = "CT1",
    called: str = "RAD-ROUTER",
) -> AAssociateAC | AAssociateRJ:
    rq = build_request(calling_ae_title=calling, called_ae_title=called, contexts=contexts)
    return negotiate(rq, config.to_acceptor_policy())


def results(
    answer: AAssociateAC | AAssociateRJ,
) -> list[tuple[PresentationContextResult, str | None]]:
    assert isinstance(answer, AAssociateAC), answer
    return [(ctx.result, ctx.transfer_syntax) for ctx in answer.presentation_contexts]


RESTRICTED = parse(
    """\
    [router]
    ae_title = "RAD-ROUTER"
    [acceptance]
    calling_ae = ["CT1", "MR1"]
    sop_classes = ["CTImageStorage", "MRImageStorage"]
    transfer_syntaxes = ["JPEG2000Lossless", "ExplicitVRLittleEndian"]
    max_pdu = 65536
    """
)


def test_policy_accepts_what_is_configured() -> None:
    answer = associate(RESTRICTED, [(CT, [IVLE, J2K_LOSSLESS]), (MR, [EVLE])])
    assert results(answer) == [
        (PresentationContextResult.ACCEPTANCE, J2K_LOSSLESS),
        (PresentationContextResult.ACCEPTANCE, EVLE),
    ]
    assert isinstance(answer, AAssociateAC)
    max_length = [i for i in answer.user_information.items if isinstance(i, MaximumLength)]
    assert max_length[0].maximum_length == 65536


def test_policy_refuses_other_sop_classes_and_transfer_syntaxes() -> None:
    contexts = [(CT, [IVLE]), (US_RETIRED, [EVLE]), (MR, [JPEG_BASELINE, EVLE])]
    answer = associate(RESTRICTED, contexts)
    assert results(answer) == [
        (PresentationContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED, None),
        (PresentationContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED, None),
        (PresentationContextResult.ACCEPTANCE, EVLE),
    ]


def test_verification_is_always_accepted_in_implicit_vr() -> None:
    # Not listed in sop_classes, implicit VR not in transfer_syntaxes: echo still works.
    answer = associate(RESTRICTED, [(uids.VERIFICATION_SOP_CLASS, [IVLE])])
    assert results(answer) == [(PresentationContextResult.ACCEPTANCE, IVLE)]


@pytest.mark.parametrize(
    ("calling", "called", "reason"),
    [
        ("CT2", "RAD-ROUTER", RejectReason.USER_CALLING_AE_NOT_RECOGNIZED),
        ("ct1", "RAD-ROUTER", RejectReason.USER_CALLING_AE_NOT_RECOGNIZED),  # case-sensitive
        ("CT1", "OTHER", RejectReason.USER_CALLED_AE_NOT_RECOGNIZED),
    ],
)
def test_policy_rejects_ae_titles(calling: str, called: str, reason: RejectReason) -> None:
    answer = associate(RESTRICTED, [(CT, [EVLE])], calling=calling, called=called)
    assert isinstance(answer, AAssociateRJ)
    assert (answer.source, answer.reason) == (RejectSource.SERVICE_USER, reason)


def test_policy_rejects_an_association_with_nothing_acceptable() -> None:
    answer = associate(RESTRICTED, [(US_RETIRED, [EVLE])])
    assert isinstance(answer, AAssociateRJ)
    assert answer.reason == RejectReason.USER_NO_REASON


def test_default_policy_accepts_every_storage_class_from_anyone() -> None:
    config = load_config(None)
    contexts = [(CT, [JPEG_BASELINE]), (US_RETIRED, [IVLE]), (FIND, [IVLE]),
                (uids.VERIFICATION_SOP_CLASS, [IVLE])]
    answer = associate(config, contexts, calling="ANYONE", called="DICOM-ROUTER")
    assert results(answer) == [
        (PresentationContextResult.ACCEPTANCE, JPEG_BASELINE),
        (PresentationContextResult.ACCEPTANCE, IVLE),
        (PresentationContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED, None),  # not storage
        (PresentationContextResult.ACCEPTANCE, IVLE),
    ]
    rejected = associate(config, [(CT, [EVLE])], called="SOMEONE-ELSE")
    assert isinstance(rejected, AAssociateRJ)
    assert rejected.reason == RejectReason.USER_CALLED_AE_NOT_RECOGNIZED


def test_any_called_ae_and_private_sop_class() -> None:
    config = parse(
        f"""\
        [acceptance]
        called_ae = "any"
        sop_classes = ["{PRIVATE_SOP}"]
        """
    )
    answer = associate(config, [(PRIVATE_SOP, [EVLE])], called="WHATEVER")
    assert results(answer) == [(PresentationContextResult.ACCEPTANCE, EVLE)]



# --- workers = "auto" under a CPU quota (cgroups) ------------------------------------


def _cgroup(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "self-cgroup").write_text(proc)
    return root, tmp_path / "self-cgroup"


@pytest.mark.parametrize(("proc", "files", "cpus"), [
    pytest.param("0::/\n", {"cpu.max": "200000 100000\n"}, 2, id="v2-container-2-cpus"),
    pytest.param("0::/\n", {"cpu.max": "150000 100000\n"}, 2, id="v2-1.5-cpus-rounds-up"),
    pytest.param("0::/\n", {"cpu.max": "max 100000\n"}, None, id="v2-no-quota"),
    pytest.param("0::/system.slice/dicom-router.service\n",
                 {"system.slice/dicom-router.service/cpu.max": "max 100000\n",
                  "system.slice/cpu.max": "300000 100000\n", "cpu.max": "max 100000\n"},
                 3, id="v2-quota-on-a-parent"),
    pytest.param("0::/a/b\n", {"a/b/cpu.max": "500000 100000\n", "a/cpu.max": "100000 100000\n"},
                 1, id="v2-smallest-wins"),
    pytest.param("4:cpu,cpuacct:/\n", {"cpu/cpu.cfs_quota_us": "400000\n",
                                       "cpu/cpu.cfs_period_us": "100000\n"}, 4, id="v1"),
    pytest.param("4:cpu,cpuacct:/\n", {"cpu/cpu.cfs_quota_us": "-1\n",
                                       "cpu/cpu.cfs_period_us": "100000\n"}, None,
                 id="v1-no-quota"),
    pytest.param("0::/\n", {"cpu.max": "garbage\n"}, None, id="unreadable"),
    pytest.param("0::/\n", {}, None, id="no-cpu-controller"),
])
def test_cgroup_cpu_limit(tmp_path: Path, proc: str, files: dict[str, str],
                          cpus: int | None) -> None:
    root, self_cgroup = _cgroup(tmp_path, proc, files)
    assert cgroup_cpu_limit(root, self_cgroup) == cpus


def test_auto_workers_follow_the_cpu_quota_not_the_node(tmp_path: Path) -> None:
    """A Kubernetes pod with limits.cpu: 1 on a node of many cores: one worker."""
    root, self_cgroup = _cgroup(tmp_path, "0::/\n", {"cpu.max": "100000 100000\n"})
    assert default_workers(cgroup_root=root, proc_cgroup=self_cgroup) == 1
    unlimited, self_cgroup = _cgroup(tmp_path / "u", "0::/\n", {"cpu.max": "max 100000\n"})
    assert default_workers(cgroup_root=unlimited, proc_cgroup=self_cgroup) == min(
        len(os.sched_getaffinity(0)), MAX_WORKERS)


def test_a_destination_knows_its_peer_by_ae_title_or_address() -> None:
    from router.config import Destination

    pacs = Destination(name="pacs", host="10.1.2.3", port=104, ae_title="PACS")
    assert pacs.is_peer("PACS", "192.168.0.9")  # its AE title, from anywhere
    assert pacs.is_peer("PACS_OUT", "10.1.2.3")  # another AE title, from its host
    assert not pacs.is_peer("ATTACKER", "10.1.2.4")
    assert not pacs.is_peer("ATTACKER", "not an address")
    local = Destination(name="local", host="localhost", port=104, ae_title="LOCAL")
    assert local.is_peer("X", "127.0.0.1")  # a host name, resolved
    assert not local.is_peer("X", "10.9.9.9")


def test_a_rules_path_that_is_not_there_names_the_file_line_and_key(tmp_path: Path) -> None:
    """It was said by the rules loader with the path alone, naming neither the
    configuration file nor the key (an outside campaign)."""
    config = tmp_path / "router.toml"
    config.write_text('[routing]\nrules = "rulez.d"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert str(caught.value) == (f"{config}:2: [routing] rules: no such file or folder: "
                                 f"{tmp_path / 'rulez.d'}")
