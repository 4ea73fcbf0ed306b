"""The firewall on real lab hosts: what the shipped example exposes, a failed first apply,
and the egress allow-list. Every reachability check is a real TCP connection (from this
machine, the lab's gateway, and from the other lab host) and every ruleset check reads the
host's real `nft` state.
"""

from __future__ import annotations

import copy
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpunode.config import read_yaml
from gpunode.paths import REPO_ROOT

from .conftest import Lab, changes, planned_changes, pyinfra
from .test_hardening import can_connect, peer_can_connect

INVENTORY = "inventories/lab.py"
DEPLOY = "tests/lab/firewall_deploy.py"
ROLLBACK_SECONDS = 20
# the exporters' ports (node_exporter, dcgm-exporter) and the usual inference ports
METRICS_PORTS, INFERENCE_PORTS = (9100, 9400), (8000, 8080)


def write_data(lab: Lab, tmp: Path, name: str, doc: dict[str, Any]) -> dict[str, str]:
    path = tmp / f"{name}.yml"
    path.write_text(yaml.safe_dump(doc))
    return {**lab.env, "GPUNODE_LAB_DATA": str(path)}


def lab_doc() -> dict[str, Any]:
    return copy.deepcopy(read_yaml(REPO_ROOT / "inventories" / "lab.yml"))


def stateless_ruleset(lab: Lab, host: str) -> str:
    return lab.ssh(host, "nft -s list ruleset", check=True).stdout


def boot_config(lab: Lab, host: str) -> str:
    """What the host loads at boot: the units enabled, gpunode's unit and the ruleset file it
    loads, and their contents."""
    return lab.ssh(
        host,
        "systemctl is-enabled ufw.service gpunode-firewall.service 2>&1; "
        "ls -R /etc/systemd/system/*.wants 2>&1; "
        "sha1sum /etc/systemd/system/gpunode-firewall.service /etc/gpunode/firewall/gpunode.nft "
        "/etc/ufw/ufw.conf 2>&1; true",
        check=True,
    ).stdout


@pytest.fixture(scope="module")
def nft_hosts(lab: Lab) -> Lab:
    """nftables on both hosts, ufw (the firewall gpunode replaces) enabled on lab-01."""
    proxy = f"-o Acquire::http::Proxy={lab.settings.proxy_url}"
    for host, extra in (("lab-01", " ufw"), ("lab-02", "")):
        lab.ssh(
            host,
            f"apt-get -q {proxy} update >/dev/null && DEBIAN_FRONTEND=noninteractive "
            f"apt-get -q -y {proxy} install --no-install-recommends nftables{extra} >/dev/null",
            check=True,
            timeout=300,
        )
    # as after a boot: ufw.service started (it loads the rules ufw enable saved)
    lab.ssh("lab-01", "ufw allow 22/tcp && ufw --force enable && systemctl start ufw", check=True)
    assert lab.ssh("lab-01", "systemctl is-active ufw.service").stdout.strip() == "active"
    return lab


def test_a_failed_first_apply_leaves_the_previous_firewall(nft_hosts: Lab, tmp_path: Path) -> None:
    """Finding 10: the first gpunode ruleset locks the controller out (confirmation fails):
    ufw keeps running, the node's rules are exactly the earlier ones once the rollback has
    fired, and nothing of the boot configuration changed."""
    lab = nft_hosts
    before, boot_before = stateless_ruleset(lab, "lab-01"), boot_config(lab, "lab-01")
    assert "chain ufw-user-input" in before and "table inet gpunode" not in before
    assert "enabled" in boot_before.splitlines()  # ufw.service
    assert "/etc/gpunode/firewall/gpunode.nft: No such file or directory" in boot_before

    doc = lab_doc()
    doc["defaults"]["network"]["admin_cidrs"] = ["192.0.2.0/24"]  # not the controller
    doc["defaults"]["firewall"] = {"force_admin_cidrs": True, "rollback_seconds": ROLLBACK_SECONDS}
    env = write_data(lab, tmp_path, "lockout", doc)
    started = time.monotonic()
    proc = pyinfra(INVENTORY, DEPLOY, "--limit", "lab-01", env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert "host lab-01: firewall: a new SSH connection from the controller failed" in out
    assert not can_connect(lab.address("lab-01"), 22, timeout=1)  # really locked out

    while time.monotonic() < started + ROLLBACK_SECONDS + 30:
        if can_connect(lab.address("lab-01"), 22, 1):
            break
        time.sleep(1)
    assert stateless_ruleset(lab, "lab-01") == before  # ufw's rules, nothing of gpunode's
    assert lab.ssh("lab-01", "systemctl is-active ufw.service").stdout.strip() == "active"
    assert boot_config(lab, "lab-01") == boot_before

    # the good config: confirmed, kept for boot, and only then is ufw stopped and disabled
    good = write_data(lab, tmp_path, "good", lab_doc())
    pyinfra(INVENTORY, DEPLOY, "--limit", "lab-01", env=good, check=True)
    after = stateless_ruleset(lab, "lab-01")
    assert "table inet gpunode" in after and "ufw-user-input" not in after
    state = lab.ssh(
        "lab-01", "systemctl is-enabled ufw.service gpunode-firewall.service; true"
    ).stdout.split()
    assert state == ["disabled", "enabled"]
    second = pyinfra(INVENTORY, DEPLOY, "--limit", "lab-01", env=good, check=True)
    assert changes(second.stdout + second.stderr) == (0, 0)


def example_on_the_lab(lab: Lab) -> dict[str, Any]:
    """inventories/example.yml's firewall, network, monitoring and inference settings on the
    lab's hosts, its placeholder networks replaced with lab addresses: the admin CIDRs
    with this machine (the controller), the monitoring and app CIDRs with lab-02."""
    example = read_yaml(REPO_ROOT / "inventories" / "example.yml")
    sections = ("firewall", "network", "monitoring", "inference", "nomad")
    for layer in [*(g.get("data", {}) for g in example["groups"].values())]:
        assert not set(sections) & set(layer), "the example's groups set firewall settings"
    for entry in example["hosts"].values():
        assert not set(sections) & set(entry.get("data", {})), "...and so do its hosts"
    doc = lab_doc()
    for key in sections:
        doc["defaults"].pop(key, None)
        if key in example["defaults"]:
            doc["defaults"][key] = copy.deepcopy(example["defaults"][key])
    s, peer = lab.settings, f"{lab.address('lab-02')}/32"
    lab_cidrs = {
        "admin_cidrs": [f"{s.gateway}/32", f"{s.gateway6}/128"],
        "app_cidrs": [peer],
        "monitoring_cidrs": [peer],
    }
    network = doc["defaults"]["network"]
    assert set(network) <= set(lab_cidrs), network
    for key in network:
        network[key] = lab_cidrs[key]
    return doc


@pytest.fixture
def listeners(nft_hosts: Lab) -> Iterator[None]:
    lab, ports = nft_hosts, (*METRICS_PORTS, *INFERENCE_PORTS)
    units = [f"gpunode-test-listen-{port}" for port in ports]
    for unit, port in zip(units, ports, strict=True):
        lab.ssh(
            "lab-01",
            f"systemd-run --unit={unit} python3 -m http.server --bind :: {port}",
            check=True,
        )
    for port in ports:  # each one answers on lab-01's own loopback
        deadline = time.monotonic() + 10
        while not peer_can_connect(lab, "lab-01", "127.0.0.1", port):
            assert time.monotonic() < deadline, f"nothing listens on lab-01:{port}"
            time.sleep(0.2)
    yield
    lab.ssh("lab-01", "systemctl stop " + " ".join(units))


def test_the_shipped_example_exposes_only_ssh_to_the_admin_cidrs(
    nft_hosts: Lab, listeners: None, tmp_path: Path
) -> None:
    """Finding 1: inventories/example.yml as shipped (firewall.enabled not set)."""
    lab = nft_hosts
    # no other firewall on lab-01 (the first test leaves ufw disabled; this test alone too)
    lab.ssh("lab-01", "ufw --force disable", check=True)
    env = write_data(lab, tmp_path, "example", example_on_the_lab(lab))
    pyinfra(INVENTORY, DEPLOY, env=env, check=True)
    v4, v6 = lab.address("lab-01"), lab.settings.host_address6(1)
    # from the admin CIDR (this machine): SSH, and nothing else
    assert can_connect(v4, 22) and can_connect(v6, 22)
    for port in (*METRICS_PORTS, *INFERENCE_PORTS):
        assert not can_connect(v4, port, timeout=1), port
        assert not can_connect(v6, port, timeout=1), port
    # from the monitoring (and app) CIDR, lab-02: the exporters' ports only; no SSH, and
    # no inference port (the example defines no inference service)
    for port in METRICS_PORTS:
        assert peer_can_connect(lab, "lab-02", v4, port), port
    for port in (22, *INFERENCE_PORTS):
        assert not peer_can_connect(lab, "lab-02", v4, port), port
    assert planned_changes(INVENTORY, DEPLOY, env) == {}


@pytest.fixture
def outside(nft_hosts: Lab) -> Iterator[int]:
    """A TCP listener on this machine at the lab's gateway address, a port no rule allows."""
    server = socket.create_server((nft_hosts.settings.gateway, 0))
    server.settimeout(0.5)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                conn.close()
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


def test_egress_allow_list(nft_hosts: Lab, outside: int, tmp_path: Path) -> None:
    """With firewall.egress on, lab-01 reaches the package proxy and nothing else of the
    gateway; the drops are counted."""
    lab, s = nft_hosts, nft_hosts.settings
    doc = lab_doc()
    doc["defaults"]["base"]["ntp_servers"] = [s.gateway]  # by address: no name to resolve
    open_env = write_data(lab, tmp_path, "open", doc)
    pyinfra(INVENTORY, DEPLOY, env=open_env, check=True)
    assert peer_can_connect(lab, "lab-01", s.gateway, outside)  # the listener answers

    doc["defaults"]["firewall"]["egress"] = {"enabled": True}
    env = write_data(lab, tmp_path, "egress", doc)
    pyinfra(INVENTORY, DEPLOY, env=env, check=True)
    counted = "nft list counter inet gpunode egress_dropped | awk '/packets/ {print $2}'"
    dropped_before = int(lab.ssh("lab-01", counted, check=True).stdout)
    assert not peer_can_connect(lab, "lab-01", s.gateway, outside)
    assert int(lab.ssh("lab-01", counted, check=True).stdout) > dropped_before
    # the proxy still answers, and apt fetches through it
    assert peer_can_connect(lab, "lab-01", s.gateway, s.proxy_port)
    proxy = f"-o Acquire::http::Proxy={s.proxy_url}"
    assert lab.ssh("lab-01", f"apt-get -q {proxy} update", timeout=300).returncode == 0
    assert planned_changes(INVENTORY, DEPLOY, env) == {}
