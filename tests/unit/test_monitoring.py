"""The monitoring section and role (gpunode/monitoring.py, roles/monitoring.py), and the
example Prometheus configuration and alert rules under monitoring/.

The role runs through pyinfra's real API against the ``@fake`` connector (the harness of
tests/unit/harness.py): a fresh host answers nothing, so everything is installed.
The lab runs it for real on Debian 12 (tests/lab/test_drift.py); dcgm-exporter needs
NVIDIA's repository and a GPU, so it is covered here only.

GPU answers: the PCI lines of the ``NvidiaHost`` fact (gpunode/facts/nvidia.py, the one PCI
GPU fact) for an H100 SXM5 (class 0x0302, device 0x2330) and an NVSwitch (class 0x0680).

promtool is Debian's own (package ``prometheus``, same version as the distro's Prometheus):
the test extracts just that binary from the package (``apt-get download``, verified by apt)
into /var/cache/gpunode/promtool, once.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pyinfra
import pytest
from harness import RecordingFakeConnector, find_promtool, host_info_output
from pyinfra.api import Config, Inventory, State
from pyinfra.api.connect import connect_all
from pyinfra.api.deploy import add_deploy
from pyinfra.api.operations import run_ops

from gpunode.config import load
from gpunode.facts.nvidia import NvidiaHost
from gpunode.facts.server import HostInfo
from gpunode.monitoring import metrics_ports
from gpunode.paths import REPO_ROOT
from gpunode.schema.node import NodeConfig
from gpunode.schema.types import ConfigError
from roles.monitoring import monitoring

MONITORING = REPO_ROOT / "monitoring"

H100 = "pci=0000:1b:00.0 0x030200 0x2330"
NVSWITCH = "pci=0000:05:00.0 0x068000 0x22a3"


# --- promtool ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def promtool() -> str:
    return find_promtool()


def run_promtool(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], cwd=MONITORING, capture_output=True, text=True, timeout=60
    )


def test_example_prometheus_config_is_valid(promtool: str) -> None:
    proc = run_promtool(promtool, "check", "config", "prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 rule files found" in proc.stdout


def test_alert_rules_are_valid_and_fire_when_they_should(promtool: str) -> None:
    check = run_promtool(promtool, "check", "rules", "gpunode-alerts.yml")
    assert check.returncode == 0, check.stdout + check.stderr
    names = re.findall(
        r"^\s+- alert: (\S+)$", (MONITORING / "gpunode-alerts.yml").read_text(), re.M
    )
    for wanted in (
        "GpuXidError",
        "GpuUncorrectableEccErrors",
        "InferenceDown",
        "DriftDetected",
        "DriftRunFailing",
    ):
        assert wanted in names
    # each alert is exercised by the promtool unit test, firing and not firing
    tests = (MONITORING / "tests" / "alerts-test.yml").read_text()
    for wanted in (
        "GpuXidError",
        "GpuUncorrectableEccErrors",
        "InferenceDown",
        "DriftDetected",
        "DriftRunFailing",
        "DriftRunStale",
    ):
        assert tests.count(f"alertname: {wanted}") >= 1, wanted
    run = run_promtool(promtool, "test", "rules", "tests/alerts-test.yml")
    assert run.returncode == 0, run.stdout + run.stderr


def test_promtool_catches_a_broken_rule(promtool: str, tmp_path: Path) -> None:
    # the checks above can fail: a rule with a bad expression is refused
    bad = (
        (MONITORING / "gpunode-alerts.yml")
        .read_text()
        .replace("gpunode_drift_operations > 0", "gpunode_drift_operations >")
    )
    (tmp_path / "rules.yml").write_text(bad)
    proc = subprocess.run(
        [promtool, "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, timeout=60
    )
    assert proc.returncode != 0


# --- the section ---------------------------------------------------------------------------


def config(distro: str = "debian12", port: int = 22, **monitoring_: Any) -> NodeConfig:
    raw = {
        # the firewall (on by default) is the firewall role's: not this role's concern
        "defaults": {"distro": distro, "monitoring": monitoring_, "firewall": {"enabled": False}},
        "hosts": {"gpu-01": {"connection": {"address": "192.0.2.10", "port": port}}},
    }
    return load(raw, source="test_monitoring").hosts["gpu-01"].config


def test_metrics_ports_default_and_switched_off() -> None:
    assert metrics_ports(config()) == [("tcp", 9100), ("tcp", 9400)]
    assert metrics_ports(config(dcgm_exporter=False)) == [("tcp", 9100)]
    assert metrics_ports(config(node_exporter=False, dcgm_exporter_port=9500)) == [("tcp", 9500)]
    assert metrics_ports(config(node_exporter=False, dcgm_exporter=False)) == []


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"dcgm_exporter_port": 9100},
            "host gpu-01: monitoring.dcgm_exporter_port: 9100 is already "
            "monitoring.node_exporter_port (allowed: two different ports)",
        ),
        (
            {"node_exporter_port": 2222, "port": 2222},
            "host gpu-01: monitoring.node_exporter_port: 2222 is the SSH port",
        ),
        ({"node_exporter_port": 70000}, "monitoring.node_exporter_port"),
        ({"textfile_dir": "relative/dir"}, "monitoring.textfile_dir"),
        ({"textfile_dir": "/var/lib/x;rm -rf /"}, "monitoring.textfile_dir"),
        ({"dcgm_exporter": "sometimes"}, "monitoring.dcgm_exporter"),
    ],
)
def test_bad_monitoring_settings_fail_at_load(settings: dict[str, Any], message: str) -> None:
    port = settings.pop("port", 22)
    with pytest.raises(ConfigError) as err:
        config(port=port, **settings)
    assert message in str(err.value)


def test_gpu_count_fact_counts_gpus_not_nvswitches() -> None:
    fact = NvidiaHost()
    assert len(fact.process([H100, H100.replace("1b:00.0", "29:00.0"), NVSWITCH])["gpus"]) == 2
    assert len(fact.process([])["gpus"]) == 0
    # the command itself, run here on this machine's sysfs: no NVIDIA GPU
    out = subprocess.run(["sh", "-c", fact.command()], capture_output=True, text=True)
    assert out.returncode == 0
    assert len(fact.process(out.stdout.splitlines())["gpus"]) == 0


# --- the role ------------------------------------------------------------------------------


def run_monitoring(node: NodeConfig, pci: list[str], os_release: str = "debian12"):
    assert not pyinfra.is_cli
    responses: dict[Any, Any] = {
        NvidiaHost().command(): pci,
        HostInfo().command(): list(host_info_output(os_release)),
    }
    data = {"gpunode": node, "fake_delay": 0, "fake_delay_jitter": 0, "fake_responses": responses}
    inventory = Inventory(([("@fake/gpu-01", data)], {}))
    for host in inventory:
        host.connector_cls = RecordingFakeConnector
    state = State(inventory, Config())
    host = inventory.get_host("@fake/gpu-01")
    connect_all(state)
    add_deploy(state, monitoring)
    run_ops(state)
    connector = host.connector
    assert isinstance(connector, RecordingFakeConnector)
    names = sorted(n for meta in state.op_meta.values() for n in meta.names)
    return list(connector.executed_commands), dict(connector.uploads), names


def installs(commands: list[str]) -> list[str]:
    return [c for c in commands if re.search(r"\b(apt-get|dnf)\b.*\binstall\b", c)]


def test_node_exporter_reads_the_textfile_directory_no_gpu_no_dcgm() -> None:
    commands, uploads, names = run_monitoring(config(), pci=[])
    assert any("mkdir -p /var/lib/gpunode/textfile" in c for c in commands)
    assert any("chmod 755 /var/lib/gpunode/textfile" in c for c in commands)
    (install,) = installs(commands)
    assert "prometheus-node-exporter" in install and "--no-install-recommends" in install
    flags = uploads["/etc/default/prometheus-node-exporter"]
    assert re.search(
        r'^ARGS="--web.listen-address=:9100 '
        r'--collector.textfile.directory=/var/lib/gpunode/textfile"$',
        flags,
        re.M,
    )
    assert any("systemctl enable prometheus-node-exporter.service" in c for c in commands)
    assert any("systemctl start prometheus-node-exporter.service" in c for c in commands)
    assert not any("dcgm" in c for c in commands)
    assert "gpunode monitoring | dcgm-exporter" in names  # the visible skip


def test_dcgm_exporter_on_a_gpu_node() -> None:
    commands, uploads, _ = run_monitoring(config(dcgm_exporter_port=9401), pci=[H100, NVSWITCH])
    assert any("datacenter-gpu-manager-exporter" in c for c in installs(commands))
    dropin = uploads["/etc/systemd/system/nvidia-dcgm-exporter.service.d/50-gpunode.conf"]
    assert "[Service]\nEnvironment=DCGM_EXPORTER_LISTEN=:9401" in dropin
    assert any(c.strip().endswith("systemctl daemon-reload") for c in commands)
    assert any("systemctl start nvidia-dcgm-exporter.service" in c for c in commands)
    assert any("systemctl enable nvidia-dcgm-exporter.service" in c for c in commands)


def test_dcgm_exporter_forced_off_and_on() -> None:
    off, _, _ = run_monitoring(config(dcgm_exporter=False), pci=[H100])
    assert not any("dcgm" in c for c in off)
    on, _, _ = run_monitoring(config(dcgm_exporter=True, node_exporter=False), pci=[])
    assert any("datacenter-gpu-manager-exporter" in c for c in installs(on))
    assert not any("prometheus-node-exporter" in c for c in on)


def test_el9_skips_node_exporter_visibly_and_installs_dcgm_with_dnf() -> None:
    commands, uploads, names = run_monitoring(config("rocky9"), pci=[H100], os_release="rocky9")
    assert "gpunode monitoring | node_exporter" in names
    assert not any("node-exporter" in c for c in commands)
    (install,) = installs(commands)
    assert install.startswith("dnf") and "datacenter-gpu-manager-exporter" in install
    assert "/etc/systemd/system/nvidia-dcgm-exporter.service.d/50-gpunode.conf" in uploads
