"""The controller's systemd units (templates/controller/), checked offline by systemd."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
import yaml
from pyinfra.api.exceptions import PyinfraError

from gpunode import controller as ctl
from gpunode.config import load_file
from gpunode.monitoring import CREDENTIAL_MAX_BYTES, CredentialError, read_credential
from gpunode.paths import REPO_ROOT, TEMPLATES
from gpunode.schema.types import ConfigError


def render(tmp_path: Path, **overrides: object) -> tuple[Path, Path]:
    service_args: dict[str, object] = dict(
        repo=ctl.REPO,
        venv=ctl.VENV,
        inventory="/etc/gpunode/controller/fleet.py",
        deploy=f"{ctl.REPO}/deploys/gpu_node.py",
        apply=True,
        state_dir=ctl.STATE,
        writable=[ctl.STATE, "/var/lib/gpunode/textfile"],
        textfile="/var/lib/gpunode/textfile/gpunode_drift.prom",
        lock=ctl.LOCK,
        lock_busy_status=ctl.LOCK_BUSY,
    )
    service_args.update(overrides)
    out = []
    for name, args in (
        (ctl.SERVICE, service_args),
        (ctl.TIMER, {"schedule": "hourly", "randomized_delay": "5min"}),
    ):
        template = jinja2.Template((TEMPLATES / "controller" / f"{name}.j2").read_text())
        path = tmp_path / name
        path.write_text(template.render(**args))
        out.append(path)
    return out[0], out[1]


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if not found:
        pytest.fail("systemd-analyze (package systemd) is needed for these checks")
    return found


def test_units_pass_systemd_analyze_verify(tmp_path: Path, systemd_analyze: str) -> None:
    service, timer = render(tmp_path)
    proc = subprocess.run(
        [systemd_analyze, "verify", str(timer), str(service)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    # systemd-analyze verify exits 0 on unknown keys, only warning: any output is a failure
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


def test_verify_catches_a_bad_key(tmp_path: Path, systemd_analyze: str) -> None:
    service, _ = render(tmp_path)
    service.write_text(service.read_text().replace("PrivateTmp=yes", "PrivateTmpp=yes"))
    proc = subprocess.run([systemd_analyze, "verify", str(service)], capture_output=True, text=True)
    assert "PrivateTmpp" in proc.stderr


def test_run_is_locked_logged_and_confined(tmp_path: Path, systemd_analyze: str) -> None:
    service, timer = render(tmp_path, apply=False)
    text = service.read_text()
    (exec_start,) = re.findall(r"^ExecStart=(.*)$", text, re.M)
    assert exec_start.startswith(f"/usr/bin/flock --nonblock --conflict-exit-code 75 {ctl.LOCK} ")
    assert " drift /etc/gpunode/controller/fleet.py /opt/gpunode/repo/deploys/gpu_node.py " in (
        exec_start
    )
    assert "--apply" not in exec_start  # monitoring.drift.apply: false only reports
    assert "--prometheus /var/lib/gpunode/textfile/gpunode_drift.prom" in exec_start
    assert "SuccessExitStatus=75" in text and "SyslogIdentifier=gpunode-drift" in text
    assert "OnCalendar=hourly" in timer.read_text()
    proc = subprocess.run(
        [systemd_analyze, "security", "--offline=true", str(service)],
        capture_output=True,
        text=True,
    )
    level = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert level, proc.stdout + proc.stderr
    # a root service with no capabilities, read-only system, own /tmp, no devices
    assert float(level[1]) <= 5.0, proc.stdout


def test_the_timer_runs_a_module_that_exists_and_parses_its_arguments(tmp_path: Path) -> None:
    """The unit's ``python -m MODULE drift ...`` names gpunode's real command line (a module
    moved without its unit would fail every run on the controller)."""
    service, _ = render(tmp_path)
    (exec_start,) = re.findall(r"^ExecStart=(.*)$", service.read_text(), re.M)
    command = exec_start.split(" -m ", 1)[1].split()
    module, args = command[0], command[1:]
    proc = subprocess.run(
        [sys.executable, "-m", module, args[0], "--help"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    for flag in (a for a in args if a.startswith("--")):
        assert flag in proc.stdout, (flag, proc.stdout)


# --- the drift run's credentials: where they may go, what may be read (finding 2) ----------


def _inventory(tmp_path: Path, credentials: dict[str, str]) -> Path:
    doc = {
        "defaults": {
            "distro": "debian12",
            "network": {"admin_cidrs": ["192.0.2.0/28"], "monitoring_cidrs": []},
            "monitoring": {"drift": {"credentials": credentials}},
        },
        "hosts": {"ctl-01": {"connection": {"address": "192.0.2.1"}}},
    }
    path = tmp_path / "inv.yml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    "dest", ["/root/.ssh/id_ed25519", "/etc/gpunode/controller/keys/id", "/etc/gpunode/controller"]
)
def test_a_credential_outside_the_root_only_directory_is_refused_at_load(
    tmp_path: Path, dest: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_file(_inventory(tmp_path, {dest: "/tmp/key"}))  # noqa: S108
    assert str(info.value) == (
        f"{tmp_path / 'inv.yml'}: defaults: monitoring.drift.credentials: {dest}: not a file "
        "in /etc/gpunode/controller (allowed: /etc/gpunode/controller/NAME, the controller's "
        "root-only directory)"
    )


def test_a_credential_in_the_root_only_directory_loads(tmp_path: Path) -> None:
    inv = load_file(_inventory(tmp_path, {"/etc/gpunode/controller/id_ed25519": "~/.ssh/k"}))
    drift = inv.hosts["ctl-01"].config.monitoring.drift
    assert drift.credentials == {"/etc/gpunode/controller/id_ed25519": "~/.ssh/k"}


ALLOWED = (
    "(allowed: a readable, non-empty file of at most 1 MiB on the machine that deploys the "
    "controller)"
)


def test_a_credential_source_is_read_or_refused_with_a_clear_error(tmp_path: Path) -> None:
    """At deploy time, before any operation runs (a PyinfraError: pyinfra prints its message,
    no traceback): missing, empty, a directory, a FIFO (without blocking), too large."""
    dest = "/etc/gpunode/controller/id_ed25519"
    good = tmp_path / "key"
    good.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\n")
    assert read_credential("ctl-01", dest, str(good)) == good.read_bytes()
    (tmp_path / "empty").write_bytes(b"")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "big").write_bytes(b"x" * (CREDENTIAL_MAX_BYTES + 1))
    cases = {
        "missing": "no such file or directory",
        "empty": "the file is empty",
        "fifo": "not a regular file",
        ".": "not a regular file",
        "big": f"{CREDENTIAL_MAX_BYTES + 1} bytes",
    }
    for name, reason in cases.items():
        local = str(tmp_path / name)
        with pytest.raises(CredentialError) as info:
            read_credential("ctl-01", dest, local)
        assert str(info.value) == (
            f"host ctl-01: monitoring.drift.credentials: {dest}: {local}: {reason} {ALLOWED}"
        )
        assert isinstance(info.value, PyinfraError)
