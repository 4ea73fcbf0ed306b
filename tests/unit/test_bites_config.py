"""Tests that bite (issue 18): config and credential checks whose planted bugs survived.

Each test here was run against one bug planted in the code and failed with it (issue 18's
closing note lists bug -> test):

* a port of `firewall.extra_input` (or `firewall.egress.extra`) above 65535 is refused at
  config load, not later by `nft`; an inference port below 1024 is refused at load;
* `vault.secret_id_file` is refused with any group or other permission bit, before Vault is
  contacted, and the refusal never shows the secret_id;
* `network.monitoring_cidrs: []` closes the metrics ports to every address: the real
  renderer opens them to nobody (and the real ``nft -c`` accepts the ruleset), and every
  port the input chain opens is opened to some source CIDRs, never to any address;
* an inference service on the node's SSH port (`connection.port`) or on an exporter's port
  is refused at load, naming both keys (the two bugs issue 18 found in unmodified code).

Inventories go through gpunode's real loader from a real file, so every message is checked
for the file, the host, the key and what is allowed.
"""

from __future__ import annotations

import copy
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import RUNTIME_INSTALLS, SERVICES, nft_check

from gpunode import firewall, monitoring
from gpunode.clients.vault import Session, VaultError, read_root_only
from gpunode.config import load_file
from gpunode.schema.node import NodeConfig
from gpunode.schema.types import ConfigError
from gpunode.schema.vault import Secret, Vault

HOST = "gpu-01"
# The firewall is on (the default) and every kind of service has its CIDRs: a refusal below
# is the one the test is about. The host's TEST-NET address skips the anti-lockout check.
ADDRESS = "192.0.2.10"
NETWORK = {
    "admin_cidrs": ["192.0.2.0/24"],
    "app_cidrs": ["198.51.100.0/24"],
    "monitoring_cidrs": ["203.0.113.0/28"],
}
# A CPU service (llama.cpp) and a GPU one with a metrics port of its own (Triton), without
# API keys (those need Vault, not these tests).
CHAT = {k: v for k, v in SERVICES["small"].items() if k != "api_key_secret"}
VISION = copy.deepcopy(SERVICES["vision"])  # port 9000: gRPC 9001, metrics 9002
RUNTIMES = {"llamacpp": RUNTIME_INSTALLS["llamacpp"], "triton": RUNTIME_INSTALLS["triton"]}


def write_inventory(
    tmp_path: Path, data: dict[str, Any], ssh_port: int = 22, network: dict[str, Any] = NETWORK
) -> Path:
    """An inventory file with one host whose own `data` is ``data`` (errors name the host)."""
    inventory = {
        "defaults": {"distro": "debian12", "network": network},
        "hosts": {HOST: {"connection": {"address": ADDRESS, "port": ssh_port}, "data": data}},
    }
    path = tmp_path / "inv.yml"
    path.write_text(yaml.safe_dump(inventory), encoding="utf-8")
    return path


def load_host(tmp_path: Path, data: dict[str, Any], ssh_port: int = 22) -> NodeConfig:
    return load_file(write_inventory(tmp_path, data, ssh_port)).hosts[HOST].config


def refusal(tmp_path: Path, data: dict[str, Any], ssh_port: int = 22) -> str:
    """The one-line message config load refuses ``data`` with."""
    path = write_inventory(tmp_path, data, ssh_port)
    with pytest.raises(ConfigError) as err:
        load_file(path)
    message = str(err.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"{path}: host {HOST}: "), message
    return message.removeprefix(f"{path}: host {HOST}: ")


def inference(*services: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return {"inference": {"runtimes": RUNTIMES, "services": dict(services)}}


# --- ports in range at load ------------------------------------------------------------------


def extra_input(port: int) -> dict[str, Any]:
    rule = {"name": "node-api", "proto": "tcp", "port": port, "cidrs": ["192.0.2.0/28"]}
    return {"firewall": {"extra_input": [rule]}}


def egress_extra(port: int) -> dict[str, Any]:
    rule = {"name": "registry", "proto": "tcp", "port": port, "cidrs": ["192.0.2.64/28"]}
    return {"firewall": {"egress": {"extra": [rule]}}}


FIREWALL_PORTS = {
    "firewall.extra_input[0].port": extra_input,
    "firewall.egress.extra[0].port": egress_extra,
}


@pytest.mark.parametrize("key", sorted(FIREWALL_PORTS))
@pytest.mark.parametrize("port", [65536, 70000])
def test_a_firewall_port_above_65535_is_refused_at_load(
    key: str, port: int, tmp_path: Path
) -> None:
    """nft would refuse it only on the node, after the run started: load refuses it."""
    message = refusal(tmp_path, FIREWALL_PORTS[key](port))
    assert message.startswith(f"{key}: {port}: "), message
    assert message.endswith("(allowed: a number at most 65535)"), message


def test_the_highest_port_is_opened_and_nft_accepts_it(tmp_path: Path) -> None:
    config = load_host(tmp_path, extra_input(65535))
    assert config.firewall.extra_input[0].port == 65535
    ruleset = firewall.render_ruleset(config, 22)
    assert 'ip saddr { 192.0.2.0/28 } tcp dport { 65535 } accept comment "node-api"' in ruleset
    check = nft_check(ruleset)
    assert check.returncode == 0, check.stderr


INFERENCE_PORTS = {
    # key: the service's settings with the port in place of PORT
    "inference.services.chat.port": ("chat", {**CHAT, "port": "PORT"}),
    "inference.services.vision.grpc_port": ("vision", {**VISION, "grpc_port": "PORT"}),
    "inference.services.vision.metrics_port": ("vision", {**VISION, "metrics_port": "PORT"}),
}


def with_port(key: str, port: int) -> dict[str, Any]:
    name, settings = INFERENCE_PORTS[key]
    return inference((name, {k: port if v == "PORT" else v for k, v in settings.items()}))


@pytest.mark.parametrize("key", sorted(INFERENCE_PORTS))
@pytest.mark.parametrize("port", [1023, 80, 1])
def test_an_inference_port_below_1024_is_refused_at_load(
    key: str, port: int, tmp_path: Path
) -> None:
    """The service runs as its own user, without CAP_NET_BIND_SERVICE: it could not bind a
    privileged port, and a privileged port is no service's to take."""
    message = refusal(tmp_path, with_port(key, port))
    assert message.startswith(f"{key}: {port}: "), message
    assert message.endswith("(allowed: a number at least 1024)"), message


@pytest.mark.parametrize("key", sorted(INFERENCE_PORTS))
def test_an_inference_port_of_1024_is_accepted(key: str, tmp_path: Path) -> None:
    config = load_host(tmp_path, with_port(key, 1024))
    name, _ = INFERENCE_PORTS[key]
    svc = config.inference.services[name]
    ports = {
        "port": svc.port,
        "grpc_port": svc.effective_grpc_port(),
        "metrics_port": svc.effective_metrics_port(),
    }
    assert ports[key.rsplit(".", 1)[1]] == 1024


# --- vault.secret_id_file: root-only ---------------------------------------------------------

SECRET_ID = "5ecret-1d-0f-the-controller"  # noqa: S105 - a test value, never shown


def octal(mode: int) -> str:
    return f"{mode:04o}"


def secret_id_file(tmp_path: Path, mode: int) -> Path:
    path = tmp_path / "secret_id"
    path.unlink(missing_ok=True)  # a mode without the owner's write bit, left by the last one
    path.write_text(SECRET_ID + "\n")
    path.chmod(mode)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    return path


def refused_message(path: Path, mode: int) -> str:
    return (
        f"vault.secret_id_file {path}: owned by uid {os.geteuid()} with mode {mode:04o} "
        "(allowed: a regular file owned by root, mode 0600 or 0400)"
    )


@pytest.mark.parametrize(
    "mode", [0o640, 0o604, 0o620, 0o602, 0o660, 0o644, 0o610, 0o601], ids=octal
)
def test_a_secret_id_file_others_may_touch_is_refused_before_vault(
    mode: int, tmp_path: Path
) -> None:
    """Through the public path (a Session reading a secret): refused before any request
    (vault.addr is an unroutable TEST-NET address), the message names the file, its mode
    and what is allowed, and never shows the secret_id."""
    path = secret_id_file(tmp_path, mode)
    vault = Vault(
        addr="https://192.0.2.1:8200",
        role_id="gpunode-controller",
        secret_id_file=str(path),
        retries=0,
        timeout=1.0,
    )
    session = Session(vault, environ={})
    with pytest.raises(VaultError) as err:
        session.read("demo", Secret(path="gpunode/demo", key="api_key"))
    assert str(err.value) == (
        "secret demo (secret/gpunode/demo#api_key): " + refused_message(path, mode)
    )
    assert "5ecret" not in str(err.value)
    assert session.client is None  # never logged in


def test_every_mode_with_a_group_or_other_bit_is_refused(tmp_path: Path) -> None:
    """All 504 modes with a group or other bit (read, write or execute; with or without
    owner bits), each refused with its own mode in the message."""
    modes = [mode for mode in range(0o1000) if mode & 0o077]
    assert len(modes) == 512 - 8
    for mode in modes:
        path = secret_id_file(tmp_path, mode)
        with pytest.raises(VaultError) as err:
            read_root_only(str(path))
        assert str(err.value) == refused_message(path, mode)
        assert "5ecret" not in str(err.value)


@pytest.mark.parametrize("mode", [0o600, 0o400], ids=octal)
def test_a_root_only_secret_id_file_is_read(mode: int, tmp_path: Path) -> None:
    path = secret_id_file(tmp_path, mode)
    assert read_root_only(str(path)) == SECRET_ID


# --- metrics ports with network.monitoring_cidrs: [] ------------------------------------------


def port_rules(ruleset: str) -> list[tuple[str, set[int], str]]:
    """(rule, ports, sources) of every accept rule of the input and forward chains that
    matches a port; sources is the text of its `saddr { ... }` ("" when it has none)."""
    rules = []
    for name in ("input", "forward"):
        body = re.search(rf"\tchain {name} {{\n(.*?)\n\t}}", ruleset, re.S)
        assert body, ruleset
        for line in body[1].splitlines():
            line = line.strip()
            ports = re.search(r"(?:dport|proto-dst) \{ ([0-9, ]+) \}", line)
            if line.startswith("#") or not line.endswith(("accept", '"')) or not ports:
                continue
            sources = re.search(r"saddr \{ ([^}]*) \}", line)
            rules.append(
                (line, {int(p) for p in ports[1].split(", ")}, sources[1] if sources else "")
            )
    return rules


# Node_exporter and dcgm-exporter (on by default; dcgm explicitly here) and Triton's own
# metrics port (9002); the firewall opens them to network.monitoring_cidrs only.
METRICS_NODE = {
    "monitoring": {"dcgm_exporter": True},
    "firewall": {"containers": True},  # the forward chain publishes ports too
    **inference(("vision", VISION)),
}


def test_the_metrics_ports_are_opened_to_the_monitoring_cidrs(tmp_path: Path) -> None:
    """Control for the test below: the same node and the same reading of the ruleset find
    the metrics ports opened, to the monitoring CIDRs and nothing else."""
    config = load_host(tmp_path, METRICS_NODE)
    metrics = {port for _, port in monitoring.metrics_ports(config)}
    assert metrics == {9100, 9400, 9002}
    ruleset = firewall.render_ruleset(config, 22)
    opened = [(ports & metrics, src) for _, ports, src in port_rules(ruleset) if ports & metrics]
    assert opened == [(metrics, "203.0.113.0/28")] * 2  # input, and forward (DNAT)


def test_empty_monitoring_cidrs_open_the_metrics_ports_to_nobody(tmp_path: Path) -> None:
    """`monitoring_cidrs: []` is a choice: the exporters run, and no address reaches them.
    The rendered ruleset accepts none of their ports (in the input chain or as published
    container ports), every port rule it has names its sources, and nft accepts it."""
    data = {**METRICS_NODE, "network": {**NETWORK, "monitoring_cidrs": []}}
    config = load_host(tmp_path, data)
    metrics = {port for _, port in monitoring.metrics_ports(config)}
    assert metrics == {9100, 9400, 9002}
    ruleset = firewall.render_ruleset(config, 22)
    rules = port_rules(ruleset)
    assert {r.split(" comment ")[1] for r, _, _ in rules} == {'"ssh"', '"inference"'}
    assert [rule for rule, ports, _ in rules if ports & metrics] == []
    assert [rule for rule, _, src in rules if not src or "/0" in src] == []
    check = nft_check(ruleset)
    assert check.returncode == 0, check.stderr


def test_exporters_without_monitoring_cidrs_are_refused_at_load(tmp_path: Path) -> None:
    """Unset (not `[]`) with the firewall on: load asks for the CIDRs, naming the ports."""
    network = {k: v for k, v in NETWORK.items() if k != "monitoring_cidrs"}
    path = write_inventory(tmp_path, {}, network=network)
    with pytest.raises(ConfigError) as err:
        load_file(path)
    assert str(err.value) == (
        f"{path}: host {HOST}: network.monitoring_cidrs: not set while the node serves metrics "
        "exporters (monitoring.*) on tcp/9100, tcp/9400 and the firewall is on (allowed: the "
        "CIDRs that may reach them, e.g. [192.0.2.16/28]; [] to close them to every address; or "
        "firewall.enabled: false to run the node without gpunode's firewall)"
    )


# --- one port, one listener: SSH and the exporters --------------------------------------------


@pytest.mark.parametrize(
    ("data", "ssh_port", "message"),
    [
        pytest.param(
            inference(("chat", {**CHAT, "port": 2222})),
            2222,
            "inference.services.chat.port: 2222 is the SSH port (connection.port; allowed: "
            "any other port)",
            id="service-port-on-ssh-2222",
        ),
        pytest.param(
            inference(("chat", {**CHAT, "port": 8022})),
            8022,
            "inference.services.chat.port: 8022 is the SSH port (connection.port; allowed: "
            "any other port)",
            id="service-port-on-ssh-8022",
        ),
        pytest.param(
            inference(("vision", {**VISION, "port": 2221})),
            2222,
            "inference.services.vision.grpc_port: 2222 is the SSH port (connection.port; "
            "allowed: any other port)",
            id="derived-grpc-port-on-ssh",
        ),
        pytest.param(
            inference(("vision", {**VISION, "metrics_port": 2222})),
            2222,
            "inference.services.vision.metrics_port: 2222 is the SSH port (connection.port; "
            "allowed: any other port)",
            id="metrics-port-on-ssh",
        ),
    ],
)
def test_an_inference_service_on_the_ssh_port_is_refused(
    data: dict[str, Any], ssh_port: int, message: str, tmp_path: Path
) -> None:
    """The firewall would open the SSH port to network.app_cidrs (issue 18: found in
    unmodified code)."""
    assert refusal(tmp_path, data, ssh_port) == message


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(
            inference(("chat", {**CHAT, "port": 9100})),
            "inference.services.chat.port: 9100 is already used by "
            "monitoring.node_exporter_port (allowed: a port no other listener on the node uses)",
            id="node-exporter-default-port",
        ),
        pytest.param(
            {
                "monitoring": {"node_exporter_port": 9200},
                **inference(("chat", {**CHAT, "port": 9200})),
            },
            "inference.services.chat.port: 9200 is already used by "
            "monitoring.node_exporter_port (allowed: a port no other listener on the node uses)",
            id="node-exporter-port-9200",
        ),
        pytest.param(
            inference(("vision", {**VISION, "port": 9099})),
            "inference.services.vision.grpc_port: 9100 is already used by "
            "monitoring.node_exporter_port (allowed: a port no other listener on the node uses)",
            id="derived-grpc-port-on-node-exporter",
        ),
        pytest.param(
            inference(("chat", {**CHAT, "port": 9400})),
            "inference.services.chat.port: 9400 is already used by "
            "monitoring.dcgm_exporter_port (allowed: a port no other listener on the node uses)",
            id="dcgm-exporter-default-port",
        ),
    ],
)
def test_an_inference_service_on_an_exporters_port_is_refused(
    data: dict[str, Any], message: str, tmp_path: Path
) -> None:
    """Two servers cannot bind one port; the firewall would open it to two sets of CIDRs
    (issue 18: found in unmodified code)."""
    assert refusal(tmp_path, data) == message


def test_the_same_services_on_free_ports_load(tmp_path: Path) -> None:
    """Control for the two tests above: it is the port that is refused, not the service."""
    data = {
        "monitoring": {"node_exporter_port": 9200},
        **inference(("chat", {**CHAT, "port": 8080}), ("vision", VISION)),
    }
    config = load_host(tmp_path, data, ssh_port=2222)
    assert [s.port for s in config.inference.services.values()] == [8080, 9000]
