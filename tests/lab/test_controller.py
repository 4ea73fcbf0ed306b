"""deploys/controller.py on a lab host: gpunode in a venv from an uploaded wheelhouse, the
fleet's credentials root-only, and a timer whose drift run corrects a node by itself.

lab-01 is the controller, lab-02 the fleet (a node converged by deploys/gpu_node.py).
The timer runs every 20 s here (monitoring.drift.schedule); nothing starts the service
by hand before the correction is observed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import yaml

from gpunode.commands.lab import inventory_spec
from gpunode.paths import REPO_ROOT

from .conftest import Lab, changes, pyinfra

CTL = "/etc/gpunode/controller"
LOADER = (
    "from gpunode.inventory import from_yaml\n_gpunode = from_yaml(__file__)\n"
    "globals().update(_gpunode.pyinfra_groups())\n"
)


@pytest.fixture(scope="module")
def controller(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("controller")
    pyinfra(
        "inventories/lab.py", "deploys/gpu_node.py", "--limit", "lab-02", env=lab.env, check=True
    )
    # The fleet as the controller sees it: lab-02, reached with the lab key from the
    # controller's own credential files (no Vault from inside the lab: no secrets).
    doc, _ = inventory_spec(lab.settings)
    node = doc["hosts"]["lab-02"]
    node["connection"].update(key_file=f"{CTL}/id_ed25519", known_hosts_file=f"{CTL}/known_hosts")
    doc["hosts"] = {"lab-02": node}
    doc["defaults"].pop("vault", None)
    doc["defaults"].pop("secrets", None)
    (tmp / "fleet.yml").write_text(yaml.safe_dump(doc))
    (tmp / "fleet.py").write_text(LOADER)
    # The controller's own settings: the lab's data plus the drift timer.
    data = yaml.safe_load((REPO_ROOT / "inventories" / "lab.yml").read_text())
    data["defaults"]["monitoring"] = {
        "drift": {
            "inventory": f"{CTL}/fleet.py",
            "schedule": "*:*:0/20",
            "randomized_delay": "0",
            "credentials": {
                f"{CTL}/id_ed25519": str(lab.state_dir / "id_ed25519"),
                f"{CTL}/known_hosts": str(lab.state_dir / "known_hosts"),
                f"{CTL}/fleet.yml": str(tmp / "fleet.yml"),
                f"{CTL}/fleet.py": str(tmp / "fleet.py"),
            },
        }
    }
    (tmp / "controller.yml").write_text(yaml.safe_dump(data))
    # The controller gets the repository at HEAD; in a checkout where others commit while
    # the test runs, HEAD moves every few seconds. Deploy the controller from a clone of
    # HEAD instead (gpunode imported from it), the way one deploys from a release checkout.
    clone = tmp / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True)
    ctl = Lab(
        env={
            **lab.env,
            "GPUNODE_LAB_DATA": str(tmp / "controller.yml"),
            "GPUNODE_LAB_DIR": str(lab.state_dir),
            "PYTHONPATH": str(clone),
        },
        state_dir=lab.state_dir,
        hosts=lab.hosts,
    )
    ctl.clone = clone  # type: ignore[attr-defined]
    first = deploy_controller(ctl)
    assert changes(first.stdout + first.stderr)[0] > 0, "a fresh controller needs changes"
    yield ctl
    # the other lab tests share these hosts: no drift run behind their backs
    ctl.ssh("lab-01", "systemctl disable --now gpunode-drift.timer", check=True)


def deploy_controller(ctl: Lab) -> subprocess.CompletedProcess[str]:
    """deploys/controller.py from the clone (its own directory first on sys.path)."""
    clone = ctl.clone  # type: ignore[attr-defined]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyinfra",
            "-y",
            "inventories/lab.py",
            "deploys/controller.py",
            "--limit",
            "lab-01",
        ],
        cwd=clone,
        env={**os.environ, **ctl.env},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=900,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"controller deploy exited {proc.returncode}:\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-4000:]}"
        )
    return proc


def test_second_controller_deploy_changes_nothing(controller: Lab) -> None:
    again = deploy_controller(controller)
    assert changes(again.stdout + again.stderr) == (0, 0)


def test_credentials_are_root_only_and_gpunode_runs_from_the_venv(controller: Lab) -> None:
    out = controller.ssh(
        "lab-01", f"stat -c '%a %U %G %n' {CTL}/* && stat -c '%a' {CTL}", check=True
    )
    lines = out.stdout.split("\n")
    assert lines[-2] == "700"
    for line in lines[:-2]:
        assert line.startswith("600 root root "), line
    version = controller.ssh(
        "lab-01",
        "cd /opt/gpunode/repo && PYTHONPATH=/opt/gpunode/repo "
        "/opt/gpunode/venv/bin/python -m gpunode.commands.cli --version",
        check=True,
    )
    assert version.stdout.startswith("gpunode ")
    # the venv was filled from the uploaded wheelhouse only: pyinfra is there, pip's
    # cache never saw an index
    pyinfra_version = controller.ssh(
        "lab-01",
        "/opt/gpunode/venv/bin/python -c 'import pyinfra, importlib.metadata as m; "
        'print(m.version("pyinfra"))\'',
        check=True,
    )
    assert pyinfra_version.stdout.startswith("3.")


def test_the_timer_fires_and_corrects_drift_by_itself(controller: Lab) -> None:
    timer = controller.ssh(
        "lab-01",
        "systemctl is-enabled gpunode-drift.timer; systemctl is-active gpunode-drift.timer",
        check=True,
    )
    assert timer.stdout.split() == ["enabled", "active"]
    controller.ssh("lab-02", "systemctl stop prometheus-node-exporter.service", check=True)
    stopped_at = time.time()
    deadline = stopped_at + 240
    corrected = ""
    while time.time() < deadline:
        log = controller.ssh(
            "lab-01",
            f"journalctl -q -o cat -t gpunode-drift --no-pager --since @{int(stopped_at)}",
        )
        if "lab-02: drift corrected" in log.stdout and "node_exporter running" in log.stdout:
            corrected = log.stdout
            break
        time.sleep(5)
    assert corrected, f"no correcting run within 240 s; journal:\n{log.stdout[-3000:]}"
    assert (
        controller.ssh(
            "lab-02", "systemctl is-active prometheus-node-exporter.service"
        ).stdout.strip()
        == "active"
    )
    # the run's report reaches Prometheus through the controller's node_exporter
    metrics = controller.ssh("lab-01", "curl -sf http://127.0.0.1:9100/metrics", check=True)
    assert 'gpunode_drift_host_ok{host="lab-02"} 1' in metrics.stdout
    assert "gpunode_drift_success 1" in metrics.stdout
    # it was the timer: it has triggered, and nothing else starts the service here
    trigger = controller.ssh(
        "lab-01", "systemctl show -p LastTriggerUSec --value gpunode-drift.timer", check=True
    )
    assert trigger.stdout.strip() not in ("", "n/a")


def test_runs_never_overlap(controller: Lab) -> None:
    # hold the lock as a running drift would; a run started meanwhile skips (exit 75, not a
    # failure) and does not check anything
    proc = controller.ssh(
        "lab-01",
        "flock /run/lock/gpunode-drift.lock sh -c 'systemctl start gpunode-drift.service; "
        "systemctl show -p ExecMainStatus -p Result gpunode-drift.service'",
        check=True,
    )
    assert "ExecMainStatus=75" in proc.stdout
    assert "Result=success" in proc.stdout


def test_the_repository_copy_names_its_commit_for_provenance(controller: Lab) -> None:
    stamp = controller.ssh("lab-01", "cat /opt/gpunode/repo/.gpunode-source.json", check=True)
    doc = json.loads(stamp.stdout)
    clone_head = subprocess.run(
        ["git", "-C", str(controller.clone), "rev-parse", "HEAD"],  # type: ignore[attr-defined]
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert doc == {"commit": clone_head, "dirty": False}
    record = controller.ssh("lab-02", "cat /etc/gpunode/provenance.json", check=True)
    # lab-02 was last corrected by the controller's run: its record names the copy's commit
    assert json.loads(record.stdout)["repository"] == doc
