"""``rules check`` and ``rules test``, run in-process through argparse."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest

from rules.cli import add_rules_parser, run_rules
from tests.rules.support import CT_SMALL, MR_SMALL

RULES = """\
[[rule]]
name = "chest CT"
[rule.when]
calling_ae = "CT*"
Modality = "CT"
[rule.then]
forward = ["pacs", "ai"]
[[rule.then.change]]
destination = "ai"
set = { PatientName = "ANON" }
remove = "PatientBirthDate"

[[rule]]
name = "night MR"
when.Modality = "MR"
when.time = { from = "22:00", to = "06:00" }
then.reject = 0xA801

[[rule]]
name = "drop the rest from MR1"
when.calling_ae = "MR1"
then.drop = true
"""

CONFIG = """\
[router]
ae_title = "DICOM-ROUTER"

[[destination]]
name = "pacs"
host = "10.0.0.1"
port = 104
ae_title = "PACS"

[[destination]]
name = "ai"
host = "10.0.0.2"
port = 104
ae_title = "AI"
"""


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="dicom-router")
    sub = parser.add_subparsers(dest="command")
    add_rules_parser(sub)
    args = parser.parse_args(["rules", *argv])
    assert args.handler is run_rules
    code: int = args.handler(args)
    return code


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(RULES)
    return path


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "router.toml"
    path.write_text(CONFIG)
    return path


# ------------------------------------------------------------------ check


def test_check_ok_without_config(rules_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run("check", str(rules_file)) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{rules_file}: 3 rules OK",
        "destination names not checked: give --config to check them",
    ]


def test_check_ok_with_config(rules_file: Path, config_file: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    assert _run("check", str(rules_file), "--config", str(config_file)) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{rules_file}: 3 rules OK",
        f"{config_file}: OK; destination names checked against it (ai, pacs)",
    ]


def test_check_folder_one_line_per_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        ) -> None:
    folder = tmp_path / "rules.d"
    folder.mkdir()
    (folder / "a.toml").write_text('[[rule]]\nname = "a"\nthen.drop = true\n')
    (folder / "b.toml").write_text("# nothing yet\n")
    assert _run("check", str(folder)) == 0
    assert capsys.readouterr().out.splitlines()[:2] == [
        f"{folder / 'a.toml'}: 1 rule OK", f"{folder / 'b.toml'}: 0 rules OK"]


def test_check_reports_problems(tmp_path: Path, config_file: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(RULES.replace('["pacs",', '["pacss",').replace("Modality", "Modallity", 1))
    assert _run("check", str(path), "-c", str(config_file)) == 2
    assert capsys.readouterr().out.splitlines() == [
        f"{path}:5: rule \"chest CT\": unknown attribute keyword 'Modallity' "
        "(did you mean 'Modality'?)",
        f"{path}:7: rule \"chest CT\": forward: unknown destination 'pacss' (did you "
        "mean 'pacs'?); the configuration has: ai, pacs",
        "2 problems: the rules cannot be used",
    ]


def test_check_bad_config(rules_file: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "router.toml"
    config.write_text("[[destination]]\nhost = 'x'\n")
    assert _run("check", str(rules_file), "--config", str(config)) == 2
    assert capsys.readouterr().out == (f"dicom-router rules: {config}:1: [[destination]] #1: "
                                       '"name" is missing (name, host, port and ae_title '
                                       "are required)\n")


def test_check_checks_the_whole_config_as_run_does(
        rules_file: Path, config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """deploy/README.md: "check both" before starting. The file was read for its
    destination names alone: a typo in [spool] passed, and `run` then refused it
    (an outside campaign)."""
    config_file.write_text(config_file.read_text() + "[spool]\nfsnyc = true\n")
    assert _run("check", str(rules_file), "--config", str(config_file)) == 2
    said = capsys.readouterr().out
    assert said.startswith(f"dicom-router rules: {config_file}:") and "fsnyc" in said, said


def test_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run("check", str(tmp_path / "nope.toml")) == 2
    assert capsys.readouterr().out.splitlines()[0] == (f"{tmp_path / 'nope.toml'}: "
                                                       "no such file or folder")


# ------------------------------------------------------------------- test


def test_dry_run_sees_pixel_data_as_the_router_does(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`rules test` read files without their pixel data, so a rule testing
    "(7FE0,0010)" said "missing" where the running router matched (a campaign)."""
    rules = tmp_path / "images.toml"
    rules.write_text('[[rule]]\nname = "images"\n[rule.when]\n'
                     '"(7FE0,0010)" = { present = true }\n[rule.then]\ndrop = true\n')
    assert _run("test", str(rules), str(MR_SMALL), "--calling-ae", "MR1") == 0
    assert f'  rule "images" ({rules}:1): matched' in capsys.readouterr().out.splitlines()


def test_dry_run_forward_with_changes(rules_file: Path, config_file: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    code = _run("test", str(rules_file), str(CT_SMALL), "--calling-ae", "CT1",
                "--at", "2026-11-25T14:00", "--config", str(config_file))
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"3 rules from {rules_file}; calling AE CT1, called AE DICOM-ROUTER, "
                      "peer 127.0.0.1, at wed 2026-11-25 14:00:00")
    assert out[2].startswith(f"{CT_SMALL}: CT 1.3.6.1.4.1.5962.")
    assert out[3:] == [
        f'  rule "chest CT" ({rules_file}:1): matched',
        "      calling AE 'CT1' matches 'CT*'",
        "      Modality 'CT' equals 'CT'",
        f'  rule "night MR" ({rules_file}:13): not reached (would not match)',
        "      Modality 'CT' does not equal 'MR'",
        "      time wed 14:00:00 is outside 22:00-06:00",
        f'  rule "drop the rest from MR1" ({rules_file}:19): not reached (would not match)',
        "      calling AE 'CT1' does not match 'MR1'",
        '  decision: forward to pacs, ai (2 changes) by rule "chest CT"',
        "    -> pacs: no changes",
        "    -> ai: 2 changes",
        "         set PatientName = 'ANON'",
        "         remove PatientBirthDate",
    ]


def test_dry_run_says_a_change_that_cannot_be_made(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A prefix that makes CT_small's accession number too long for SH: `rules test`
    listed the change as made, while the router sent the copy unchanged (an outside
    campaign). Now the router keeps it as a dead letter, and the dry run says so."""
    rules = tmp_path / "prefix.toml"
    rules.write_text('[[rule]]\nname = "prefix"\n[rule.then]\nforward = ["ris"]\n'
                     '[[rule.then.change]]\n'
                     'set = { AccessionNumber = "RIS2024000123" }\n'
                     'replace = { AccessionNumber = { pattern = "^", with = "SITEA-" } }\n')
    assert _run("test", str(rules), str(CT_SMALL), "--calling-ae", "CT1") == 0
    out = capsys.readouterr().out.splitlines()
    assert ("         change not made: replace in AccessionNumber would be "
            "'SITEA-RIS2024000123': at most 16 characters (PS3.5 Table 6.2-1); the instance "
            "would be kept in dead/ris, not sent") in out, out


def test_dry_run_reject_drop_and_unmatched(rules_file: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert _run("test", str(rules_file), str(MR_SMALL), "--calling-ae", "MR2",
                "--at", "2026-11-25T23:30") == 0
    out = capsys.readouterr().out
    assert "; destination names not checked" in out.splitlines()[0]
    assert '  decision: reject with status 0xA801 by rule "night MR"' in out
    assert _run("test", str(rules_file), str(MR_SMALL), "--calling-ae", "MR1",
                "--at", "2026-11-25T12:00") == 0
    assert '  decision: drop by rule "drop the rest from MR1"' in capsys.readouterr().out
    assert _run("test", str(rules_file), str(MR_SMALL), "--calling-ae", "MR2",
                "--at", "2026-11-25T12:00", "--peer", "10.9.8.7", "--called-ae", "X") == 0
    out = capsys.readouterr().out
    assert "called AE X, peer 10.9.8.7" in out
    assert "  decision: unmatched: no rule matched" in out


def test_dry_run_folder_and_unreadable_instance(rules_file: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(CT_SMALL, folder / "a.dcm")
    (folder / "b.txt").write_text("not DICOM")
    code = _run("test", str(rules_file), str(folder), "--calling-ae", "CT1")
    assert code == 1
    out = capsys.readouterr().out
    assert out.count("decision: forward to pacs, ai") == 1
    assert f"{folder / 'b.txt'}: cannot read it as DICOM:" in out


def test_dry_run_bad_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[rule]]\nname = "x"\n')
    assert _run("test", str(path), str(CT_SMALL), "--calling-ae", "CT1") == 2
    assert capsys.readouterr().out == (f'{path}:1: rule "x": the rule has no action: add a '
                                       "[rule.then] table with forward, reject, drop, query "
                                       "or retrieve\n")


def test_dry_run_needs_calling_ae_and_a_valid_time(rules_file: Path) -> None:
    with pytest.raises(SystemExit):
        _run("test", str(rules_file), str(CT_SMALL))
    with pytest.raises(SystemExit):
        _run("test", str(rules_file), str(CT_SMALL), "--calling-ae", "X", "--at", "tomorrow")


def test_help_mentions_the_argument_order(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _run("test", "--help")
    out = capsys.readouterr().out
    assert "RULES INSTANCE [INSTANCE ...]" in " ".join(out.split())
    assert "--calling-ae AE" in out
