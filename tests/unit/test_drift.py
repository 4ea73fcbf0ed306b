"""gpunode drift (gpunode/commands/drift.py) through pyinfra's real API, without the lab.

Hosts are pyinfra's own connectors: ``@fake`` (answers every command with success, so
every command-yielding operation "would change"), ``@local`` (this machine, for real:
``--apply`` changes files under ``tmp_path`` and the check after it sees them), and an
SSH host on a closed loopback port (unreachable). The lab tests (tests/lab/test_drift.py)
run the same code against real hosts and deploys/gpu_node.py.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from harness import find_promtool

from gpunode.commands.drift import EXIT_DRIFT, EXIT_ERROR, EXIT_OK, HostDrift, check
from gpunode.paths import REPO_ROOT

# Per-host data steers which operations each host gets: host "a" has two operations
# that host "b" lacks, so by position (pyinfra's API-mode operation hashes) a's
# operations share change-table entries with b's other operations.
DEPLOY = """
from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import server
from gpunode.operations.server import notice

@deploy("demo")
def demo():
    if host.data.get("drifted"):
        server.shell(name="Fix A", commands=["echo s3cr3t-value"])
    notice(name="Note", message="hello")
    for item in host.data.get("items", []):
        server.shell(name="Item", commands=["true"])
    server.shell(name="Restart after Item", commands=["true"], _if=lambda: False)

demo()
"""

LOCAL_DEPLOY = """
from pyinfra import host
from pyinfra.operations import files

files.file(name="Marker file", path=host.data.marker, mode="640")
files.directory(name="Marker directory", path=host.data.marker_dir)
"""


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture
def fake_inventory(tmp_path: Path) -> str:
    return write(
        tmp_path / "inv.py",
        'nodes = [\n    ("@fake/a", {"drifted": True, "items": ["x", "y"]}),\n'
        '    ("@fake/b", {"drifted": False, "items": []}),\n]\n',
    )


@pytest.fixture
def deploy(tmp_path: Path) -> str:
    return write(tmp_path / "demo.py", DEPLOY)


def test_each_host_reports_its_own_operations_by_name(fake_inventory: str, deploy: str) -> None:
    report = check(fake_inventory, deploy)
    a, b = report.hosts["@fake/a"], report.hosts["@fake/b"]
    assert a.drifted == ["demo | Fix A", "demo | Item", "demo | Item"]
    # b's "Note" shares its table entry with a's "Fix A"; b must not inherit a's drift
    assert b.drifted == []
    assert (a.status, b.status) == ("drift", "ok")
    assert (a.checked, b.checked) == (5, 2)
    assert report.exit_code == EXIT_DRIFT


HANDLER = "demo | Restart after Item"  # the handler's name as the report writes names


def test_handlers_that_run_only_if_something_changed_are_not_drift(
    fake_inventory: str, deploy: str, tmp_path: Path
) -> None:
    """A handler (``_if=``) is planned on both hosts (5 and 2 operations with it) and is
    drift on neither. The control: the same operation without ``_if`` is drift, under
    exactly the name looked for, so the name cannot be one the report never writes."""
    report = check(fake_inventory, deploy)
    a, b = report.hosts["@fake/a"], report.hosts["@fake/b"]
    assert (a.checked, b.checked) == (5, 2)  # the handler is planned on both hosts
    assert HANDLER not in a.drifted and HANDLER not in b.drifted
    assert (a.drifted, b.drifted) == (["demo | Fix A", "demo | Item", "demo | Item"], [])
    plain = tmp_path / "plain.py"
    plain.write_text(DEPLOY.replace(", _if=lambda: False", ""))
    assert plain.read_text() != DEPLOY
    control = check(fake_inventory, str(plain))
    assert control.hosts["@fake/a"].drifted[-1] == HANDLER
    assert control.hosts["@fake/b"].drifted == [HANDLER]


def test_unreachable_host_is_an_error_and_the_others_are_still_reported(
    tmp_path: Path, deploy: str
) -> None:
    inventory = write(
        tmp_path / "inv.py",
        'nodes = [\n    ("@fake/a", {"drifted": True}),\n    ("@fake/b", {}),\n'
        f'    ("gone", {{"ssh_hostname": "127.0.0.1", "ssh_port": {closed_port()}}}),\n]\n',
    )
    report = check(inventory, deploy)
    assert report.hosts["gone"].status == "error"
    assert "cannot connect" in (report.hosts["gone"].error or "")
    assert report.hosts["@fake/a"].drifted == ["demo | Fix A"]
    assert report.hosts["@fake/b"].status == "ok"
    assert report.exit_code == EXIT_ERROR
    metrics = report.prometheus()
    assert 'gpunode_drift_host_ok{host="gone"} 0' in metrics
    assert 'gpunode_drift_operations{host="@fake/a"} 1' in metrics
    assert "gpunode_drift_success 0" in metrics


def test_apply_corrects_then_checks_again(tmp_path: Path) -> None:
    marker, marker_dir = tmp_path / "state" / "marker", tmp_path / "state" / "dir"
    marker.parent.mkdir()
    inventory = write(
        tmp_path / "inv.py",
        f'nodes = [("@local", {{"marker": "{marker}", "marker_dir": "{marker_dir}"}})]\n',
    )
    deploy = write(tmp_path / "local.py", LOCAL_DEPLOY)

    before = check(inventory, deploy)
    assert before.hosts["@local"].drifted == ["Marker file", "Marker directory"]
    assert before.exit_code == EXIT_DRIFT
    assert not marker.exists()  # a check changes nothing

    applied = check(inventory, deploy, apply=True)
    host = applied.hosts["@local"]
    assert host.drifted == ["Marker file", "Marker directory"]
    assert host.corrected == ["Marker file", "Marker directory"]
    assert host.remaining == [] and host.status == "corrected"
    assert applied.exit_code == EXIT_OK
    assert marker.is_file() and oct(marker.stat().st_mode & 0o777) == "0o640"

    marker.chmod(0o666)  # drift by hand: only that operation is reported
    again = check(inventory, deploy)
    assert again.hosts["@local"].drifted == ["Marker file"]
    marker.chmod(0o640)
    assert check(inventory, deploy).exit_code == EXIT_OK


LATE_DEPLOY = """
from pyinfra import host
from pyinfra.operations import files, server

marker = files.file(name="Marker file", path=host.data.marker, mode="640")
# runs only when the marker changed, i.e. during the correction, never in the check
server.shell(name="Meddle", commands=[f"chmod 700 {host.data.marker_dir}"], _if=marker.did_change)
files.directory(name="Marker directory", path=host.data.marker_dir, mode="755")
"""


def test_drift_that_appears_between_check_and_correction_is_corrected_and_reported(
    tmp_path: Path,
) -> None:
    # A service stopped while a timer run was between its check and its correction: the
    # operation reads its facts again when it executes and corrects it. The report must
    # name it, not only what the check saw (a lab CI run caught exactly this).
    marker, marker_dir = tmp_path / "state" / "marker", tmp_path / "state" / "dir"
    marker_dir.mkdir(parents=True, mode=0o755)
    marker_dir.chmod(0o755)
    inventory = write(
        tmp_path / "inv.py",
        f'nodes = [("@local", {{"marker": "{marker}", "marker_dir": "{marker_dir}"}})]\n',
    )
    deploy = write(tmp_path / "late.py", LATE_DEPLOY)
    applied = check(inventory, deploy, apply=True)
    host = applied.hosts["@local"]
    assert host.drifted == ["Marker file"]
    assert host.corrected == ["Marker file", "Marker directory"]  # the handler is not listed
    assert host.changed_after_check == ["Marker directory"]
    assert host.status == "corrected" and applied.exit_code == EXIT_OK
    assert oct(marker_dir.stat().st_mode & 0o777) == "0o755"
    assert host.lines() == [
        "@local: drift corrected: 2 operation(s), none left",
        "  - Marker file",
        "  - Marker directory (drifted after the check; corrected too)",
    ]


def test_repeated_names_are_matched_one_by_one() -> None:
    host = HostDrift(
        name="n", drifted=["Item", "Item"], corrected=["Item", "Item", "Item"], applied=True
    )
    assert host.changed_after_check == ["Item"]
    host.remaining = ["Item"]
    assert host.lines()[-1] == "  - Item (drifted after the check; corrected too)"


def drift_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpunode.commands.cli", "drift", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


def test_cli_reports_names_never_values(fake_inventory: str, deploy: str, tmp_path: Path) -> None:
    out_json, out_prom = tmp_path / "drift.json", tmp_path / "drift.prom"
    proc = drift_cli(fake_inventory, deploy, "--json", str(out_json), "--prometheus", str(out_prom))
    assert proc.returncode == EXIT_DRIFT, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:4] == [
        "@fake/a: drift: 3 operation(s) would change",
        "  - demo | Fix A",
        "  - demo | Item",
        "  - demo | Item",
    ]
    assert "@fake/b: no drift (2 operations checked)" in lines
    assert lines[-1] == "drift: 2 host(s): 1 ok, 1 drift"
    report = json.loads(out_json.read_text())
    assert report["exit_code"] == EXIT_DRIFT
    assert report["hosts"]["@fake/a"]["drifted"] == ["demo | Fix A", "demo | Item", "demo | Item"]
    for text in (proc.stdout, proc.stderr, out_json.read_text(), out_prom.read_text()):
        assert "s3cr3t-value" not in text
    assert (out_prom.stat().st_mode & 0o777) == 0o644


def test_prometheus_textfile_format(fake_inventory: str, deploy: str) -> None:
    text = check(fake_inventory, deploy).prometheus()
    sample = re.compile(r'^[a-z_]+(\{host="[^"]*"\})? -?[0-9.]+$')
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    assert 'gpunode_drift_operations{host="@fake/a"} 3' in text
    assert 'gpunode_drift_operations{host="@fake/b"} 0' in text
    assert "gpunode_drift_success 1" in text
    assert re.search(r"^gpunode_drift_last_run_timestamp_seconds \d{10}\.\d{3}$", text, re.M)


def test_promtool_accepts_the_textfile(fake_inventory: str, deploy: str) -> None:
    promtool = find_promtool()
    text = check(fake_inventory, deploy).prometheus()
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--limit", "nope"], "--limit nope: no such host or group (allowed: @fake/a, @fake/b"),
        (["--limit", "@fake/b", "MISSING"], "MISSING: no such deploy file"),
    ],
)
def test_bad_input_is_a_clear_error(
    fake_inventory: str, deploy: str, args: list[str], message: str
) -> None:
    positional = [a for a in args if not a.startswith("--") and a != "nope" and a != "@fake/b"]
    options = [a for a in args if a not in positional]
    proc = drift_cli(fake_inventory, *(positional or [deploy]), *options)
    assert proc.returncode == EXIT_ERROR
    assert message in proc.stderr


def test_limit_checks_only_the_named_hosts(fake_inventory: str, deploy: str) -> None:
    report = check(fake_inventory, deploy, limit=["@fake/b"])
    assert list(report.hosts) == ["@fake/b"]
    assert report.exit_code == EXIT_OK


def test_invalid_gpunode_inventory_is_an_error_not_drift(tmp_path: Path, deploy: str) -> None:
    (tmp_path / "bad.yml").write_text("defaults:\n  distro: debian99\nhosts: {}\n")
    inventory = write(
        tmp_path / "bad.py",
        "from gpunode.inventory import from_yaml\n_gpunode = from_yaml(__file__)\n"
        "globals().update(_gpunode.pyinfra_groups())\n",
    )
    proc = drift_cli(inventory, deploy)
    assert proc.returncode == EXIT_ERROR
    assert "distro" in proc.stderr and "invalid inventory" in proc.stderr
