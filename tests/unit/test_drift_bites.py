"""gpunode drift (gpunode/commands/drift.py): what a user sees, pinned where a mutation test
(``make mutate``, docs/mutation.md) found it unpinned.

The whole report text, JSON and Prometheus textfile for every host status; the exit code
when errors and drift mix; which hosts a shard checks; what the run does with each seal
verdict (a sealed host is not planned, an out-of-date seal is renewed by ``--apply`` and is
never drift); an error while correcting or while checking again; ``main``'s outputs when
the input is bad; the atomic write of the output files. Runs are real pyinfra runs through
gpunode.commands.run on ``@local`` (this machine, files under ``tmp_path``) and ``@fake``
hosts; the one seam is the seal's verdict (``drift.proven``, tested on its own in
test_seal.py), so that a test decides which hosts are sealed.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Bao, start_bao, stop_bao
from test_vault_rotation import documented_policy

from gpunode.commands import drift
from gpunode.commands.drift import (
    EXIT_DRIFT,
    EXIT_ERROR,
    EXIT_OK,
    DriftError,
    HostDrift,
    Report,
    check,
    main,
)
from gpunode.facts.seal import SEAL_SWITCH, SealVerdict


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# --- what a host's result says ------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "status", "lines"),
    [
        (
            HostDrift("n", checked=3, drifted=["A"], error="cannot connect"),
            "error",
            ["n: error: cannot connect"],
        ),
        (
            HostDrift("n", checked=9, sealed=True),
            "ok",
            ["n: no drift (sealed: 9 checks in one command)"],
        ),
        (HostDrift("n", checked=4), "ok", ["n: no drift (4 operations checked)"]),
        (
            HostDrift("n", checked=4, seal_renewed=True),
            "ok",
            ["n: no drift (4 operations checked; seal renewed)"],
        ),
        (HostDrift("n", checked=4, applied=True), "ok", ["n: no drift (4 operations checked)"]),
        (
            HostDrift("n", drifted=["A", "B"], corrected=["A", "B", "C"], applied=True),
            "corrected",
            [
                "n: drift corrected: 3 operation(s), none left",
                "  - A",
                "  - B",
                "  - C (drifted after the check; corrected too)",
            ],
        ),
        (
            HostDrift("n", drifted=["A", "B"], corrected=["A", "C"], remaining=["B"], applied=True),
            "drift",
            [
                "n: drift: 1 operation(s) would change",
                "  - B",
                "  - C (drifted after the check; corrected too)",
            ],
        ),
        (
            # not applied: what the correction changed is not reported (there was none)
            HostDrift("n", checked=5, drifted=["A", "B"], corrected=["C"]),
            "drift",
            ["n: drift: 2 operation(s) would change", "  - A", "  - B"],
        ),
    ],
)
def test_each_status_and_its_lines(host: HostDrift, status: str, lines: list[str]) -> None:
    assert host.status == status
    assert host.lines() == lines


def test_a_sealed_host_with_an_error_is_an_error() -> None:
    host = HostDrift("n", sealed=True, checked=2, error="boom")
    assert (host.status, host.lines()) == ("error", ["n: error: boom"])


# --- the report: exit code, summary, JSON, Prometheus ------------------------------------


def report_of(*hosts: HostDrift, apply: bool = False) -> Report:
    report = Report("inv.py", "deploy.py", apply=apply, started_at=1700000000.5, duration_s=2.25)
    report.hosts = {h.name: h for h in hosts}
    return report


@pytest.mark.parametrize(
    ("hosts", "code", "summary"),
    [
        ([], EXIT_OK, "drift: 0 host(s): none"),
        ([HostDrift("a")], EXIT_OK, "drift: 1 host(s): 1 ok"),
        (
            [HostDrift("a", drifted=["x"], corrected=["x"], applied=True), HostDrift("b")],
            EXIT_OK,
            "drift: 2 host(s): 1 ok, 1 corrected",
        ),
        (
            [HostDrift("a"), HostDrift("b", drifted=["x"])],
            EXIT_DRIFT,
            "drift: 2 host(s): 1 ok, 1 drift",
        ),
        (
            [
                HostDrift("a", error="e"),
                HostDrift("b", drifted=["x"]),
                HostDrift("c", drifted=["y"]),
            ],
            EXIT_ERROR,
            "drift: 3 host(s): 2 drift, 1 error",
        ),
        (
            [
                HostDrift("d", error="e"),
                HostDrift("c", drifted=["x"]),
                HostDrift("b", drifted=["x"], corrected=["x"], applied=True),
                HostDrift("a"),
            ],
            EXIT_ERROR,
            "drift: 4 host(s): 1 ok, 1 corrected, 1 drift, 1 error",
        ),
    ],
)
def test_exit_code_and_summary(hosts: list[HostDrift], code: int, summary: str) -> None:
    report = report_of(*hosts)
    assert report.exit_code == code
    assert report.lines()[-1] == summary
    assert report.to_json()["exit_code"] == code


def test_credentials_come_first_in_the_report() -> None:
    report = report_of(HostDrift("a", checked=1))
    report.credentials = ["vault: rotated"]
    assert report.lines() == [
        "vault: rotated",
        "a: no drift (1 operations checked)",
        "drift: 1 host(s): 1 ok",
    ]


def test_the_whole_json() -> None:
    report = report_of(
        HostDrift("a", checked=5, drifted=["X"], corrected=["X"], remaining=["X"], applied=True),
        HostDrift("b", error="cannot connect", seal="seal missing"),
        apply=True,
    )
    report.credentials = ["vault: rotated"]
    report.duration_s = 2.123456
    host_a = {
        "name": "a",
        "checked": 5,
        "drifted": ["X"],
        "corrected": ["X"],
        "remaining": ["X"],
        "applied": True,
        "error": None,
        "sealed": False,
        "seal": "",
        "seal_renewed": False,
        "status": "drift",
    }
    assert report.to_json() == {
        "inventory": "inv.py",
        "deploy": "deploy.py",
        "apply": True,
        "started_at": 1700000000.5,
        "duration_s": 2.123,
        "exit_code": EXIT_ERROR,
        "credentials": ["vault: rotated"],
        "hosts": {
            "a": host_a,
            "b": {
                **host_a,
                "name": "b",
                "checked": 0,
                "drifted": [],
                "corrected": [],
                "remaining": [],
                "applied": False,
                "error": "cannot connect",
                "seal": "seal missing",
                "status": "error",
            },
        },
    }


def prometheus(
    operations: list[str], remaining: list[str], ok: list[str], start: str, took: str, success: int
) -> str:
    return (
        "\n".join(
            [
                "# HELP gpunode_drift_operations Operations of the deploy that the last drift "
                "check found changing (before any correction).",
                "# TYPE gpunode_drift_operations gauge",
                *operations,
                "# HELP gpunode_drift_remaining_operations Operations still drifting after the run "
                "(after the correction with --apply).",
                "# TYPE gpunode_drift_remaining_operations gauge",
                *remaining,
                "# HELP gpunode_drift_host_ok 1 when the host was checked without error.",
                "# TYPE gpunode_drift_host_ok gauge",
                *ok,
                "# HELP gpunode_drift_last_run_timestamp_seconds When the last drift run started.",
                "# TYPE gpunode_drift_last_run_timestamp_seconds gauge",
                f"gpunode_drift_last_run_timestamp_seconds {start}",
                "# HELP gpunode_drift_last_run_duration_seconds How long the last drift run took.",
                "# TYPE gpunode_drift_last_run_duration_seconds gauge",
                f"gpunode_drift_last_run_duration_seconds {took}",
                "# HELP gpunode_drift_success 1 when the last drift run finished without error "
                "(drift found is not an error).",
                "# TYPE gpunode_drift_success gauge",
                f"gpunode_drift_success {success}",
            ]
        )
        + "\n"
    )


def test_the_whole_textfile_after_apply() -> None:
    """Per host: drift found, drift left after the correction (not the drift found), ok;
    a host in error has no operation counts (0 would read as "no drift"); label values
    escaped as Prometheus' text format wants (backslash, quote, newline)."""
    report = report_of(
        HostDrift("a", drifted=["X", "Y"], corrected=["X", "Y"], remaining=["Y"], applied=True),
        HostDrift("b", error="cannot connect"),
        HostDrift('q"\\\nz', drifted=["X"], corrected=["X"], applied=True),
        apply=True,
    )
    assert report.prometheus() == prometheus(
        [
            'gpunode_drift_operations{host="a"} 2',
            'gpunode_drift_operations{host="q\\"\\\\\\nz"} 1',
        ],
        [
            'gpunode_drift_remaining_operations{host="a"} 1',
            'gpunode_drift_remaining_operations{host="q\\"\\\\\\nz"} 0',
        ],
        [
            'gpunode_drift_host_ok{host="a"} 1',
            'gpunode_drift_host_ok{host="b"} 0',
            'gpunode_drift_host_ok{host="q\\"\\\\\\nz"} 1',
        ],
        "1700000000.500",
        "2.250",
        0,
    )


def test_the_whole_textfile_of_a_check() -> None:
    """Without --apply the drift left is the drift found."""
    report = report_of(HostDrift("a", drifted=["X", "Y"]), HostDrift("b", checked=3))
    assert report.prometheus() == prometheus(
        ['gpunode_drift_operations{host="a"} 2', 'gpunode_drift_operations{host="b"} 0'],
        [
            'gpunode_drift_remaining_operations{host="a"} 2',
            'gpunode_drift_remaining_operations{host="b"} 0',
        ],
        ['gpunode_drift_host_ok{host="a"} 1', 'gpunode_drift_host_ok{host="b"} 1'],
        "1700000000.500",
        "2.250",
        1,
    )


# --- shards ----------------------------------------------------------------------------------

FLEET = [f"@fake/gpu-{i:02d}" for i in range(12)]
NOOP = "from gpunode.operations.server import notice\nnotice(name='Note', message='hi')\n"


def shard_of(name: str, count: int) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest()[:16], 16) % count


@pytest.fixture
def fleet(tmp_path: Path) -> tuple[str, str]:
    nodes = ",\n".join(f"    ({name!r}, {{}})" for name in FLEET)
    return write(tmp_path / "fleet.py", f"nodes = [\n{nodes},\n]\n"), write(
        tmp_path / "noop.py", NOOP
    )


def test_each_shard_checks_its_own_hosts(fleet: tuple[str, str]) -> None:
    inventory, deploy = fleet
    seen: list[str] = []
    for index in range(3):
        report = check(inventory, deploy, shard=(index, 3), use_seal=False)
        wanted = [n for n in FLEET if shard_of(n, 3) == index]
        assert wanted and list(report.hosts) == wanted
        assert all(h.status == "ok" and h.checked == 1 for h in report.hosts.values())
        seen += wanted
    assert sorted(seen) == sorted(FLEET)


def test_a_shard_within_a_limit(fleet: tuple[str, str]) -> None:
    inventory, deploy = fleet
    limit = FLEET[:6]
    index = shard_of(FLEET[0], 2)
    report = check(inventory, deploy, limit=limit, shard=(index, 2), use_seal=False)
    assert list(report.hosts) == [n for n in limit if shard_of(n, 2) == index]


def test_an_empty_shard_is_no_drift(fleet: tuple[str, str], capsys: Any) -> None:
    inventory, deploy = fleet
    count = 100000
    taken = {shard_of(n, count) for n in FLEET}
    index = next(i for i in range(count) if i not in taken)
    report = check(inventory, deploy, shard=(index, count))
    assert (report.hosts, report.exit_code, report.credentials) == ({}, EXIT_OK, [])
    capsys.readouterr()
    assert main(inventory, deploy, shard=f"{index}/{count}") == EXIT_OK
    assert capsys.readouterr().out == "drift: 0 host(s): none\n"


def test_main_passes_the_shard_on(fleet: tuple[str, str], capsys: Any) -> None:
    inventory, deploy = fleet
    index = shard_of(FLEET[0], 4)
    assert main(inventory, deploy, shard=f"{index}/4", use_seal=False) == EXIT_OK
    out = capsys.readouterr().out.splitlines()
    wanted = [n for n in FLEET if shard_of(n, 4) == index]
    assert out == [
        *(f"{n}: no drift (1 operations checked)" for n in wanted),
        f"drift: {len(wanted)} host(s): {len(wanted)} ok",
    ]


# --- the seal --------------------------------------------------------------------------------

PLANNED = """
import os
from pathlib import Path
from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files, server

with open(host.data.log, "a") as log:  # who was planned, with which seal switch
    log.write(f"{host.name} {os.environ.get('GPUNODE_SEAL')}\\n")

@deploy("gpunode seal")
def seal():
    server.shell(name="Drift seal", commands=["true"])

if host.data.get("marker"):
    files.file(name="Marker file", path=host.data.marker, mode="640")
seal()
"""


def verdicts(monkeypatch: pytest.MonkeyPatch, by_host: dict[str, SealVerdict]) -> list[str]:
    """The seal's verdict per host, decided by the test; the hosts asked, in order."""
    asked: list[str] = []

    def proven(host: Any) -> SealVerdict:
        asked.append(host.name)
        return by_host[host.name]

    monkeypatch.setattr(drift, "proven", proven)
    return asked


@pytest.fixture
def sealed_fleet(tmp_path: Path) -> tuple[str, str, Path]:
    log = tmp_path / "planned.log"
    hosts = ", ".join(f'("@fake/{n}", {{"log": "{log}"}})' for n in "abc")
    return (
        write(tmp_path / "inv.py", f"nodes = [{hosts}]\n"),
        write(tmp_path / "planned.py", PLANNED),
        log,
    )


def test_sealed_hosts_are_not_planned(
    sealed_fleet: tuple[str, str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    inventory, deploy, log = sealed_fleet
    verdicts(
        monkeypatch,
        {
            "@fake/a": SealVerdict(True, "", 9),
            "@fake/b": SealVerdict(False, "differs: path /etc/x"),
            "@fake/c": SealVerdict(True, "", 4),
        },
    )
    started = time.time()
    report = check(inventory, deploy)
    took = time.time() - started
    assert log.read_text() == "@fake/b 0\n"  # only b was planned, with the deploy's seal off
    assert started <= report.started_at and 0 < report.duration_s <= took
    a, b, c = (report.hosts[f"@fake/{n}"] for n in "abc")
    assert (a.sealed, a.checked, a.seal, a.drifted) == (True, 9, "", [])
    assert (b.sealed, b.checked, b.seal, b.drifted) == (False, 1, "differs: path /etc/x", [])
    assert (c.sealed, c.checked) == (True, 4)
    assert report.exit_code == EXIT_OK
    assert report.lines() == [
        "@fake/a: no drift (sealed: 9 checks in one command)",
        "@fake/b: no drift (1 operations checked)",  # the seal op's change is not drift
        "@fake/c: no drift (sealed: 4 checks in one command)",
        "drift: 3 host(s): 3 ok",
    ]


def test_main_reads_the_seal_unless_told_not_to(
    sealed_fleet: tuple[str, str, Path], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    inventory, deploy, log = sealed_fleet
    verdicts(monkeypatch, {f"@fake/{n}": SealVerdict(True, "", 7) for n in "abc"})
    assert main(inventory, deploy, limit=["@fake/a"]) == EXIT_OK
    assert capsys.readouterr().out == (
        "@fake/a: no drift (sealed: 7 checks in one command)\ndrift: 1 host(s): 1 ok\n"
    )
    assert main(inventory, deploy, limit=["@fake/a"], use_seal=False) == EXIT_OK
    assert capsys.readouterr().out.startswith("@fake/a: no drift (1 operations checked)\n")
    assert log.read_text() == "@fake/a 0\n"


def test_every_host_sealed_plans_nothing(
    sealed_fleet: tuple[str, str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    inventory, deploy, log = sealed_fleet
    verdicts(monkeypatch, {f"@fake/{n}": SealVerdict(True, "", 7) for n in "abc"})
    report = check(inventory, deploy)
    assert not log.exists()
    assert all(h.sealed and h.checked == 7 for h in report.hosts.values())
    assert 0 < report.duration_s < 60 and report.exit_code == EXIT_OK


def test_without_the_seal_every_host_is_planned_and_no_seal_is_read(
    sealed_fleet: tuple[str, str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    inventory, deploy, log = sealed_fleet
    asked = verdicts(monkeypatch, {})
    report = check(inventory, deploy, use_seal=False)
    assert asked == []
    assert sorted(log.read_text().splitlines()) == ["@fake/a 0", "@fake/b 0", "@fake/c 0"]
    assert all(not h.sealed and h.seal == "" for h in report.hosts.values())


@pytest.mark.parametrize("before", [None, "1", "0"])
def test_the_seal_switch_is_off_while_planning_and_put_back(
    sealed_fleet: tuple[str, str, Path], monkeypatch: pytest.MonkeyPatch, before: str | None
) -> None:
    inventory, deploy, log = sealed_fleet
    if before is None:
        monkeypatch.delenv(SEAL_SWITCH, raising=False)
    else:
        monkeypatch.setenv(SEAL_SWITCH, before)
    verdicts(monkeypatch, {f"@fake/{n}": SealVerdict(False, "seal missing") for n in "abc"})
    check(inventory, deploy)
    assert {line.split()[1] for line in log.read_text().splitlines()} == {"0"}
    assert os.environ.get(SEAL_SWITCH) == before


@pytest.fixture
def local_host(tmp_path: Path) -> tuple[str, str, Path, Path]:
    marker, log = tmp_path / "state" / "marker", tmp_path / "planned.log"
    marker.parent.mkdir()
    inventory = write(
        tmp_path / "inv.py", f'nodes = [("@local", {{"marker": "{marker}", "log": "{log}"}})]\n'
    )
    return inventory, write(tmp_path / "planned.py", PLANNED), marker, log


def test_an_out_of_date_seal_alone_is_no_drift_and_apply_renews_it(
    local_host: tuple[str, str, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    inventory, deploy, marker, log = local_host
    marker.write_text("")
    marker.chmod(0o640)
    verdicts(
        monkeypatch, {"@local": SealVerdict(False, "the code or the host's inventory data changed")}
    )
    report = check(inventory, deploy)
    host = report.hosts["@local"]
    assert (host.drifted, host.status, report.exit_code) == ([], "ok", EXIT_OK)
    assert host.seal == "the code or the host's inventory data changed"

    applied = check(inventory, deploy, apply=True)
    host = applied.hosts["@local"]
    assert (host.seal_renewed, host.applied, host.corrected) == (True, False, [])
    assert (host.status, applied.exit_code) == ("ok", EXIT_OK)
    assert host.lines() == ["@local: no drift (2 operations checked; seal renewed)"]
    assert log.read_text() == "@local 0\n" * 2  # the check, the apply's plan; no re-check


def test_apply_with_drift_and_a_seal_reports_only_the_drift(
    local_host: tuple[str, str, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    inventory, deploy, marker, log = local_host
    verdicts(monkeypatch, {"@local": SealVerdict(False, "seal missing")})
    report = check(inventory, deploy, apply=True)
    host = report.hosts["@local"]
    assert host.drifted == ["Marker file"]
    assert host.corrected == ["Marker file"]  # the seal is written too, not listed
    assert (host.remaining, host.applied, host.seal_renewed) == ([], True, True)
    assert (host.status, report.exit_code) == ("corrected", EXIT_OK)
    assert report.lines() == [
        "@local: drift corrected: 1 operation(s), none left",
        "  - Marker file",
        "drift: 1 host(s): 1 corrected",
    ]
    assert oct(marker.stat().st_mode & 0o777) == "0o640"
    assert log.read_text() == "@local 0\n" * 2  # planned, then checked again


def test_a_check_without_apply_plans_once_and_changes_nothing(
    local_host: tuple[str, str, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Drift found without --apply: reported, nothing corrected, not planned a second time
    (checking again is what --apply does after correcting); the report names its inputs."""
    inventory, deploy, marker, log = local_host
    marker.write_text("")
    marker.chmod(0o600)
    verdicts(monkeypatch, {"@local": SealVerdict(False, "differs: path marker")})
    report = check(inventory, deploy)
    host = report.hosts["@local"]
    assert (host.drifted, host.corrected, host.remaining) == (["Marker file"], [], [])
    assert (host.applied, host.seal_renewed, report.exit_code) == (False, False, EXIT_DRIFT)
    assert (report.inventory, report.deploy, report.apply) == (inventory, deploy, False)
    assert oct(marker.stat().st_mode & 0o777) == "0o600"
    assert log.read_text() == "@local 0\n"


# --- errors while correcting and while checking again ----------------------------------------

FAILING = """
from pathlib import Path
from pyinfra import host
from pyinfra.operations import files, server

if Path(host.data.marker).exists() and host.data.get("fail_again"):
    raise RuntimeError("the re-check broke")
files.file(name="Marker file", path=host.data.marker, mode="640")
if host.data.get("fail_op"):
    server.shell(name="Broken", commands=["false"])
"""


def failing(tmp_path: Path, **data: Any) -> tuple[str, str, Path]:
    marker = tmp_path / "marker"
    values = {"marker": str(marker), **data}
    inventory = write(tmp_path / "inv.py", f"nodes = [('@local', {values!r})]\n")
    return inventory, write(tmp_path / "failing.py", FAILING), marker


def test_a_failed_correction_is_an_error(tmp_path: Path) -> None:
    inventory, deploy, marker = failing(tmp_path, fail_op=True)
    report = check(inventory, deploy, apply=True, use_seal=False)
    host = report.hosts["@local"]
    assert host.error == "operation failed: Broken"
    assert host.remaining == []  # not checked again
    assert report.exit_code == EXIT_ERROR
    assert report.lines() == [
        "@local: error: operation failed: Broken",
        "drift: 1 host(s): 1 error",
    ]
    assert marker.is_file()


def test_a_failed_re_check_is_an_error(tmp_path: Path) -> None:
    inventory, deploy, marker = failing(tmp_path, fail_again=True)
    report = check(inventory, deploy, apply=True, use_seal=False)
    host = report.hosts["@local"]
    assert marker.is_file() and host.corrected == ["Marker file"]
    assert host.error == "re-check: planning failed: the re-check broke"
    assert report.exit_code == EXIT_ERROR


# --- main: outputs, and bad input --------------------------------------------------------


def test_main_writes_the_report_and_its_files(tmp_path: Path, capsys: Any) -> None:
    inventory, deploy, marker = failing(tmp_path)
    out_json, out_prom = tmp_path / "out" / "drift.json", tmp_path / "prom" / "drift.prom"
    code = main(
        inventory, deploy, json_path=str(out_json), prometheus_path=str(out_prom), use_seal=False
    )
    assert code == EXIT_DRIFT
    out, err = capsys.readouterr()
    lines = [
        "@local: drift: 1 operation(s) would change",
        "  - Marker file",
        "drift: 1 host(s): 1 drift",
    ]
    assert out == "\n".join(lines) + "\n"
    data = json.loads(out_json.read_text())
    assert out_json.read_text() == json.dumps(data, indent=2) + "\n"
    assert (data["exit_code"], data["apply"], data["inventory"]) == (EXIT_DRIFT, False, inventory)
    assert data["hosts"]["@local"]["drifted"] == ["Marker file"]
    assert 'gpunode_drift_operations{host="@local"} 1' in out_prom.read_text()
    assert [p.name for p in out_prom.parent.iterdir()] == ["drift.prom"]  # no temporary left
    assert oct(out_json.stat().st_mode & 0o777) == "0o644"
    assert not marker.exists()


def test_main_with_no_output_files_writes_none(tmp_path: Path, capsys: Any) -> None:
    inventory, deploy, _ = failing(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(inventory, deploy, apply=True, use_seal=False) == EXIT_OK
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "marker"])
    assert capsys.readouterr().out.splitlines()[0] == (
        "@local: drift corrected: 1 operation(s), none left"
    )


def test_bad_input_is_one_line_and_the_files_say_error(tmp_path: Path, capsys: Any) -> None:
    inventory = write(tmp_path / "inv.py", "nodes = [('@local', {})]\n")
    out_json, out_prom = tmp_path / "drift.json", tmp_path / "drift.prom"
    missing = str(tmp_path / "missing.py")
    started = time.time()
    code = main(
        inventory, missing, apply=True, json_path=str(out_json), prometheus_path=str(out_prom)
    )
    assert code == EXIT_ERROR
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"gpunode drift: {missing}: no such deploy file\n")
    data = json.loads(out_json.read_text())
    assert (data["exit_code"], data["apply"], data["deploy"]) == (EXIT_ERROR, True, missing)
    assert data["inventory"] == inventory and started <= data["started_at"] <= time.time()
    assert data["hosts"] == {
        "-": {
            **json.loads(json.dumps(HostDrift("-").__dict__)),
            "error": f"{missing}: no such deploy file",
            "status": "error",
        }
    }
    text = out_prom.read_text()
    assert 'gpunode_drift_host_ok{host="-"} 0' in text
    assert "gpunode_drift_success 0" in text
    assert "gpunode_drift_operations{" not in text and "gpunode_drift_operations" in text


def test_a_missing_deploy_file_is_refused_before_the_inventory_is_read(tmp_path: Path) -> None:
    with pytest.raises(DriftError, match=r"^nope\.py: no such deploy file$"):
        check(str(tmp_path / "no-inventory.py"), "nope.py")
    (tmp_path / "dir.py").mkdir()
    with pytest.raises(DriftError, match=r"dir\.py: no such deploy file$"):
        check(str(tmp_path / "no-inventory.py"), str(tmp_path / "dir.py"))


# --- the atomic write ------------------------------------------------------------------------


def test_write_atomically(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "drift.prom"
    drift.write_atomically(path, "one\n")
    assert path.read_text() == "one\n" and oct(path.stat().st_mode & 0o777) == "0o644"
    drift.write_atomically(str(path), "two\n", mode=0o600)
    assert path.read_text() == "two\n" and oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in path.parent.iterdir()] == ["drift.prom"]


def test_the_temporary_file_is_made_beside_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Renamed into place, so made in the target's folder: from the system's temporary
    folder (another file system, often) the rename would fail."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-folder"))
    path = tmp_path / "out" / "drift.prom"
    drift.write_atomically(path, "x\n")
    assert path.read_text() == "x\n"
    assert [p.name for p in path.parent.iterdir()] == ["drift.prom"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "drift.prom"
    path.write_text("old\n")
    with pytest.raises(TypeError):
        drift.write_atomically(path, 42)  # type: ignore[arg-type]
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["drift.prom"]


# --- the credential step, against a real OpenBao -------------------------------------------

ROLE = "gpunode-controller"


def set_role(bao: Bao, secret_id_ttl: str) -> None:
    ttls = {"token_ttl": "60s", "secret_id_ttl": secret_id_ttl}
    bao.client().auth.approle.create_or_update_approle(ROLE, token_policies=[ROLE], **ttls)


@pytest.fixture
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bao]:
    server = start_bao(tmp_path_factory.mktemp("bao-drift"))
    client = server.client()
    client.sys.enable_auth_method("approle", path="approle")
    client.sys.create_or_update_policy(ROLE, documented_policy())
    set_role(server, "300s")
    server.role_id = client.auth.approle.read_role_id(ROLE)["data"]["role_id"]
    try:
        yield server
    finally:
        stop_bao(server)


def controller_inventory(bao: Bao, tmp_path: Path) -> str:
    """Two hosts with the same Vault config: rotated once."""
    secret_id = tmp_path / "controller" / "secret_id"
    secret_id.parent.mkdir(mode=0o700)
    secret_id.write_text(bao.secret_id(ROLE) + "\n")
    secret_id.chmod(0o600)
    vault = {
        "addr": bao.addr,
        "role_id": bao.role_id,
        "secret_id_file": str(secret_id),
        "rotate_secret_id": True,
        "retries": 1,
        "backoff": 0.1,
    }
    (tmp_path / "fleet.yml").write_text(
        json.dumps(
            {
                "defaults": {"distro": "debian12", "firewall": {"enabled": False}, "vault": vault},
                "hosts": {
                    "n1": {"connection": {"address": "192.0.2.1"}},
                    "n2": {"connection": {"address": "192.0.2.2"}},
                },
            }
        )
    )
    return write(
        tmp_path / "fleet.py",
        "from gpunode.inventory import from_yaml\n_gpunode = from_yaml(__file__)\n"
        "globals().update(_gpunode.pyinfra_groups())\n",
    )


def test_the_credential_step_rotates_each_config_once_and_says_so(bao: Bao, tmp_path: Path) -> None:
    inventory = controller_inventory(bao, tmp_path)
    path = tmp_path / "controller" / "secret_id"
    old = path.read_text()
    done = drift.rotate_credentials(drift.load_inventory(inventory))
    said = (
        f"vault: the secret_id in {path} (AppRole role {ROLE}) was replaced and the old one "
        "destroyed; "
    )
    assert done == [said + "the new one lives 300 s unless the next run replaces it"]
    assert path.read_text() != old

    set_role(bao, "0")  # no TTL
    done = drift.rotate_credentials(drift.load_inventory(inventory))
    assert done == [
        said + "the role gives the new one no TTL: set secret_id_ttl (docs/controller.md)"
    ]
    for line in done:
        assert path.read_text().strip() not in line


def test_each_distinct_vault_config_is_rotated(bao: Bao, tmp_path: Path) -> None:
    """Two hosts, two secret_id files (two Vault configs): each rotated, each said."""
    inventory = controller_inventory(bao, tmp_path)
    first = tmp_path / "controller" / "secret_id"
    second = tmp_path / "controller" / "secret_id.n2"
    second.write_text(bao.secret_id(ROLE) + "\n")
    second.chmod(0o600)
    fleet = json.loads((tmp_path / "fleet.yml").read_text())
    vault = {**fleet["defaults"]["vault"], "secret_id_file": str(second)}
    fleet["hosts"]["n2"]["data"] = {"vault": vault}
    (tmp_path / "fleet.yml").write_text(json.dumps(fleet))
    before = first.read_text(), second.read_text()

    def ring(signum: int, frame: Any) -> None:
        raise TimeoutError("the second rotation still waits for the directory's lock")

    # both files in one folder: the first rotation's lock must be gone when the second asks
    # (gevent's os.close once kept it: the run hung forever)
    old_handler = signal.signal(signal.SIGALRM, ring)
    signal.alarm(60)
    try:
        done = drift.rotate_credentials(drift.load_inventory(inventory))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_handler)
    assert [line.split(" (AppRole")[0] for line in done] == [
        f"vault: the secret_id in {first}",
        f"vault: the secret_id in {second}",
    ]
    assert (first.read_text(), second.read_text()) != before
    assert first.read_text() != before[0] and second.read_text() != before[1]


def test_a_refused_secret_id_stops_the_run_before_any_host(bao: Bao, tmp_path: Path) -> None:
    inventory = controller_inventory(bao, tmp_path)
    (tmp_path / "controller" / "secret_id").write_text("not-a-secret-id\n")
    with pytest.raises(DriftError, match=r"^credential step: vault login"):
        drift.rotate_credentials(drift.load_inventory(inventory))


def test_the_seal_and_aides_update_are_bookkeeping_wherever_they_run() -> None:
    from gpunode.commands.drift import INTEGRITY_OP, SEAL_OP, bookkeeping

    assert bookkeeping(SEAL_OP)
    assert bookkeeping(INTEGRITY_OP)  # deploys/rotate_*.py, gpu_stack.py
    assert bookkeeping(f"gpunode seal | {INTEGRITY_OP}")  # inside the seal role
    assert not bookkeeping("gpunode base | journald limits")
    assert not bookkeeping(f"{INTEGRITY_OP} (not quite)")
    assert not bookkeeping("gpunode seal | Drift seal checker")
