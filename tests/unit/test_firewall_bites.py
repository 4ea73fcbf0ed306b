"""Tests that bite (issue 18) for gpunode/firewall.py: what mutation testing found unchecked.

`make mutate` (scripts/mutate.py) planted small bugs in gpunode/firewall.py; the ones no test
noticed are the gaps closed here:

* the whole text of every refusal the firewall's config checks give (a message is
  behaviour: it names the file, host, key and what is allowed), through the real loader
  from a real file;
* the input chain's port rules, each kind with its own name, split by address family and
  protocol (IPv6-only CIDRs, a UDP port), and the forward chain's published ports for
  containers: every port but SSH, from the same sources; the real ``nft -c`` accepts both;
* egress: each mirror key with its scheme's port, a server on loopback needing no rule, a
  CIDR named twice opened once, ``dns_cidrs: []`` opening no resolver at all;
* the ``gateway`` rule on an upstream fronted by gateways on other hosts: one rule for the
  services those gateways share, per address family;
* the anti-lockout rollback (arm_rollback_command) run by a real ``sh`` against the real
  ``nft`` in a network namespace of its own: the saved table restores what was running, an
  armed rollback keeps its saved table, a refused save arms nothing;
* controller_source trying the next address when one cannot be used, and sha1 being the
  sha1 of the text (what ``sha1sum`` says).
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import RUNTIME_INSTALLS, SERVICES, need_root, nft_check

from gpunode import firewall
from gpunode.config import load_file
from gpunode.schema.node import NodeConfig
from gpunode.schema.types import ConfigError

HOST = "gpu-01"
ADDRESS = "192.0.2.10"  # TEST-NET-1: the anti-lockout check skips it
NETWORK = {
    "admin_cidrs": ["192.0.2.0/24", "2001:db8:a::/48"],
    "app_cidrs": ["198.51.100.0/24", "2001:db8:b::/48"],
    "monitoring_cidrs": ["203.0.113.0/28"],
    "cluster_cidrs": ["2001:db8:c::/48"],
}
CHAT = {k: v for k, v in SERVICES["small"].items() if k != "api_key_secret"}  # port 8080
NOMAD = {
    "enabled": True,
    "version": "1.10.5",
    "servers": ["10.0.0.10:4647"],
    "device_plugin": {"sha256": "a" * 64},
    "serf": True,  # tcp and udp 4648 as well
}


def write(tmp_path: Path, inventory: dict[str, Any]) -> Path:
    path = tmp_path / "inv.yml"
    path.write_text(yaml.safe_dump(inventory, sort_keys=False), encoding="utf-8")
    return path


def one_host(
    data: dict[str, Any],
    network: dict[str, Any] = NETWORK,
    address: str = ADDRESS,
    ssh_port: int = 22,
) -> dict[str, Any]:
    """An inventory of one host whose own `data` is ``data`` (errors name the host)."""
    return {
        "defaults": {"distro": "debian12", "network": network},
        "hosts": {HOST: {"connection": {"address": address, "port": ssh_port}, "data": data}},
    }


def load_host(tmp_path: Path, data: dict[str, Any], **kw: Any) -> NodeConfig:
    return load_file(write(tmp_path, one_host(data, **kw))).hosts[HOST].config


def refusal(tmp_path: Path, data: dict[str, Any], **kw: Any) -> str:
    """The whole message config load refuses the host with, less the `FILE: host H: ` part
    (checked here)."""
    path = write(tmp_path, one_host(data, **kw))
    with pytest.raises(ConfigError) as err:
        load_file(path)
    message = str(err.value)
    assert message.startswith(f"{path}: host {HOST}: "), message
    return message.removeprefix(f"{path}: host {HOST}: ")


def nft_accepts(ruleset: str) -> None:
    check = nft_check(ruleset)
    assert check.returncode == 0, check.stderr


def chain(ruleset: str, name: str) -> list[str]:
    """The rules of one chain, without comments and blank lines."""
    lines = ruleset.split(f"\tchain {name} {{\n", 1)[1].split("\n\t}", 1)[0].splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def named(rules: list[str]) -> list[str]:
    """The rules that carry a name (every rule gpunode builds from the config does)."""
    return [rule for rule in rules if ' accept comment "' in rule]


# --- the refusals, whole ----------------------------------------------------------------------

OFF = "or firewall.enabled: false to run the node without gpunode's firewall)"


def test_empty_admin_cidrs_are_refused_with_the_whole_message(tmp_path: Path) -> None:
    message = refusal(tmp_path, {}, network={**NETWORK, "admin_cidrs": []})
    assert message == (
        "network.admin_cidrs: empty while the firewall is on (firewall.enabled defaults to "
        "true): nobody could reach SSH (allowed: the CIDRs SSH comes from, e.g. "
        f"[192.0.2.0/28]; {OFF}"
    )


def test_an_extra_rule_on_the_connections_ssh_port_is_refused(tmp_path: Path) -> None:
    """The SSH port is the connection's (2222 here), not 22: 22 is any other port then."""
    rule = {"name": "sneaky", "port": 2222, "cidrs": ["0.0.0.0/0"]}
    message = refusal(tmp_path, {"firewall": {"extra_input": [rule]}}, ssh_port=2222)
    assert message == (
        "firewall.extra_input: rule sneaky: port 2222 is the SSH port, which "
        "network.admin_cidrs controls (allowed: any other port)"
    )
    config = load_host(
        tmp_path, {"firewall": {"extra_input": [{**rule, "port": 22}]}}, ssh_port=2222
    )
    assert [(r.name, r.port) for r in config.firewall.extra_input] == [("sneaky", 22)]


def test_admin_cidrs_that_lock_the_controller_out_are_refused(tmp_path: Path) -> None:
    """127.0.0.2 is reached from 127.0.0.1 on every machine (no route to guess); the message
    lists every admin CIDR, of both families."""
    network = {**NETWORK, "admin_cidrs": ["10.0.0.0/8", "fd00::/8"]}
    message = refusal(tmp_path, {}, network=network, address="127.0.0.2")
    assert message == (
        "network.admin_cidrs: this controller reaches 127.0.0.2 from 127.0.0.1, which none of "
        "[10.0.0.0/8, fd00::/8] covers: the firewall would lock it out (allowed: add a CIDR "
        "that covers 127.0.0.1, or set firewall.force_admin_cidrs: true when the node sees "
        "another address, e.g. behind NAT)"
    )
    covered = {**NETWORK, "admin_cidrs": ["10.0.0.0/8", "127.0.0.1/32"]}
    assert load_host(tmp_path, {}, network=covered, address="127.0.0.2").firewall.enabled


def test_a_nomad_client_without_cluster_cidrs_is_refused(tmp_path: Path) -> None:
    network = {k: v for k, v in NETWORK.items() if k != "cluster_cidrs"}
    message = refusal(tmp_path, {"nomad": NOMAD}, network=network)
    assert message == (
        "network.cluster_cidrs: not set while the node serves the Nomad client (nomad.enabled) "
        "on tcp/4646, tcp/4647, tcp/4648, udp/4648 and the firewall is on (allowed: the CIDRs "
        f"that may reach them, e.g. [192.0.2.32/28]; [] to close them to every address; {OFF}"
    )


def test_an_unset_cidr_key_for_a_service_the_node_does_not_run_is_fine(tmp_path: Path) -> None:
    """Only the kinds of service the node serves need their key: no Nomad, no exporters, no
    inference service, and none of the three keys set, loads."""
    data = {"monitoring": {"node_exporter": False, "dcgm_exporter": False}}
    config = load_host(tmp_path, data, network={"admin_cidrs": ["192.0.2.0/24"]})
    assert firewall.exposed_ports(config) == {
        "app_cidrs": [],
        "monitoring_cidrs": [],
        "cluster_cidrs": [],
    }


def test_a_server_name_without_addresses_is_refused_once_with_every_key(tmp_path: Path) -> None:
    """One name behind two keys (the proxy and Vault on one host) is one refusal naming
    both; the name is matched without regard to case."""
    data = {
        "base": {"apt_proxy": "http://Svc.Example:3128", "ntp_servers": ["192.0.2.123"]},
        "vault": {"addr": "https://svc.example:8200"},
        "firewall": {"egress": {"enabled": True}},
    }
    assert refusal(tmp_path, data) == (
        "firewall.egress.addresses: svc.example (base.apt_proxy, vault.addr) is a DNS name and "
        "nft rules hold addresses; gpunode does not resolve it (allowed: list its CIDRs, e.g. "
        "svc.example: [192.0.2.50/32], or give the server by IP address)"
    )
    data["firewall"] = {"egress": {"enabled": True, "addresses": {"SVC.example": ["192.0.2.5"]}}}
    config = load_host(tmp_path, data)
    assert named(chain(firewall.render_ruleset(config, 22), "output"))[-2:] == [
        'ip daddr { 192.0.2.5/32 } tcp dport { 3128 } accept comment "base.apt_proxy"',
        'ip daddr { 192.0.2.5/32 } tcp dport { 8200 } accept comment "vault.addr"',
    ]


def test_egress_with_only_ntp_and_vault_asks_for_a_mirror(tmp_path: Path) -> None:
    data = {
        "base": {"ntp_servers": ["192.0.2.123"]},
        "vault": {"addr": "https://192.0.2.8:8200"},
        "firewall": {"egress": {"enabled": True}},
    }
    assert refusal(tmp_path, data) == (
        "firewall.egress.enabled: the node would fetch packages from its distro's default "
        "mirrors, whose addresses no rule can hold (allowed: set base.apt_proxy, or a mirror "
        "URL such as base.apt_mirror)"
    )


def test_an_egress_refusal_comes_with_the_hosts_other_refusals(tmp_path: Path) -> None:
    """One load names every problem of the host: the egress checks add to what the checks
    before them found, they do not replace it."""
    network = {k: v for k, v in NETWORK.items() if k != "monitoring_cidrs"}
    data = {"base": {"ntp_servers": ["192.0.2.123"]}, "firewall": {"egress": {"enabled": True}}}
    path = write(tmp_path, one_host(data, network=network))
    with pytest.raises(ConfigError) as err:
        load_file(path)
    assert str(err.value).splitlines() == [
        f"{path}: host {HOST}: network.monitoring_cidrs: not set while the node serves metrics "
        "exporters (monitoring.*) on tcp/9100, tcp/9400 and the firewall is on (allowed: the "
        "CIDRs that may reach them, e.g. [192.0.2.16/28]; [] to close them to every address; "
        f"{OFF}",
        f"{path}: host {HOST}: firewall.egress.enabled: the node would fetch packages from its "
        "distro's default mirrors, whose addresses no rule can hold (allowed: set "
        "base.apt_proxy, or a mirror URL such as base.apt_mirror)",
    ]


# --- the input and forward chains --------------------------------------------------------------

# Every kind of rule: SSH and the inference port from both families, the exporters from IPv4
# only, the Nomad client from IPv6 only (tcp and udp), an extra UDP rule from both.
EVERY_KIND: dict[str, Any] = {
    "inference": {
        "runtimes": {"llamacpp": RUNTIME_INSTALLS["llamacpp"]},
        "services": {"chat": CHAT},
    },
    "nomad": NOMAD,
    "firewall": {
        "extra_input": [
            {"name": "probe", "proto": "udp", "port": 5353, "cidrs": ["10.1.0.0/16", "fd01::/16"]}
        ]
    },
}
INPUT = [
    'ip saddr { 192.0.2.0/24 } tcp dport { 2222 } accept comment "ssh"',
    'ip6 saddr { 2001:db8:a::/48 } tcp dport { 2222 } accept comment "ssh"',
    'ip saddr { 198.51.100.0/24 } tcp dport { 8080 } accept comment "inference"',
    'ip6 saddr { 2001:db8:b::/48 } tcp dport { 8080 } accept comment "inference"',
    'ip saddr { 203.0.113.0/28 } tcp dport { 9100, 9400 } accept comment "metrics"',
    'ip6 saddr { 2001:db8:c::/48 } tcp dport { 4646, 4647, 4648 } accept comment "cluster"',
    'ip6 saddr { 2001:db8:c::/48 } udp dport { 4648 } accept comment "cluster"',
    'ip saddr { 10.1.0.0/16 } udp dport { 5353 } accept comment "probe"',
    'ip6 saddr { fd01::/16 } udp dport { 5353 } accept comment "probe"',
]


def test_the_input_chain_opens_each_kind_of_port_to_its_own_sources(tmp_path: Path) -> None:
    config = load_host(tmp_path, EVERY_KIND, ssh_port=2222)
    ruleset = firewall.render_ruleset(config, 2222)
    assert named(chain(ruleset, "input")) == INPUT
    assert chain(ruleset, "forward") == [
        "type filter hook forward priority filter; policy drop;",
        'limit rate 5/minute burst 10 packets log prefix "gpunode-drop forward: " level info',
    ]
    nft_accepts(ruleset)


def dnat(proto: str, ports: str, sources: str, name: str) -> str:
    """A forward chain rule passing a published container port (DNAT) from ``sources``."""
    return (
        f"ct status dnat meta l4proto {proto} ct original proto-dst {{ {ports} }} {sources} "
        f'accept comment "{name}"'
    )


def test_containers_get_the_same_ports_forwarded_but_ssh(tmp_path: Path) -> None:
    """Published container ports (DNAT) pass the forward chain from the sources the input
    chain gives them, per family and protocol; the node's own SSH is never forwarded."""
    data = {**EVERY_KIND, "firewall": {**EVERY_KIND["firewall"], "containers": True}}
    ruleset = firewall.render_ruleset(load_host(tmp_path, data, ssh_port=2222), 2222)
    assert named(chain(ruleset, "input")) == INPUT
    assert named(chain(ruleset, "forward")) == [
        dnat("tcp", "8080", "ip saddr { 198.51.100.0/24 }", "inference"),
        dnat("tcp", "8080", "ip6 saddr { 2001:db8:b::/48 }", "inference"),
        dnat("tcp", "9100, 9400", "ip saddr { 203.0.113.0/28 }", "metrics"),
        dnat("tcp", "4646, 4647, 4648", "ip6 saddr { 2001:db8:c::/48 }", "cluster"),
        dnat("udp", "4648", "ip6 saddr { 2001:db8:c::/48 }", "cluster"),
        dnat("udp", "5353", "ip saddr { 10.1.0.0/16 }", "probe"),
        dnat("udp", "5353", "ip6 saddr { fd01::/16 }", "probe"),
    ]
    nft_accepts(ruleset)


# --- egress ------------------------------------------------------------------------------------


def test_egress_without_a_proxy_opens_each_mirror_on_its_schemes_port(tmp_path: Path) -> None:
    """Each mirror key on its own rule (the port from the URL, or its scheme's); Vault on
    loopback needs no rule; a CIDR that two NTP servers share is opened once; `dns_cidrs:
    []` opens no resolver (no rule at all, not one without addresses)."""
    data = {
        "base": {
            "apt_mirror": "https://192.0.2.90/debian",
            "ntp_servers": ["192.0.2.123", "NTP.example.org"],
        },
        "nvidia": {"mirror": "https://[2001:db8::91]/nvidia"},
        "cuda": {"container_toolkit_mirror": "https://192.0.2.92:8443/libnvidia-container"},
        "nomad": {**NOMAD, "repo_url": "https://mirror.example.org/hashicorp"},
        "vault": {"addr": "https://127.0.0.1:8200"},
        "firewall": {
            "egress": {
                "enabled": True,
                "dns_cidrs": [],
                "addresses": {
                    "ntp.example.org": ["192.0.2.123/32", "2001:db8::123/128"],
                    "mirror.example.org": ["192.0.2.94/32"],
                },
                "extra": [{"name": "syslog", "proto": "udp", "port": 514, "cidrs": ["10.9.0.1"]}],
            }
        },
    }
    ruleset = firewall.render_ruleset(load_host(tmp_path, data), 22)
    assert named(chain(ruleset, "output")) == [
        'ip daddr { 192.0.2.123/32 } udp dport { 123 } accept comment "base.ntp_servers"',
        'ip6 daddr { 2001:db8::123/128 } udp dport { 123 } accept comment "base.ntp_servers"',
        'ip daddr { 192.0.2.90/32 } tcp dport { 443 } accept comment "base.apt_mirror"',
        'ip6 daddr { 2001:db8::91/128 } tcp dport { 443 } accept comment "nvidia.mirror"',
        "ip daddr { 192.0.2.92/32 } tcp dport { 8443 } accept comment "
        '"cuda.container_toolkit_mirror"',
        'ip daddr { 192.0.2.94/32 } tcp dport { 443 } accept comment "nomad.repo_url"',
        'ip daddr { 10.9.0.1/32 } udp dport { 514 } accept comment "syslog"',
    ]
    assert "8200" not in ruleset
    nft_accepts(ruleset)


def test_egress_with_a_proxy_opens_the_proxy_and_no_mirror(tmp_path: Path) -> None:
    data = {
        "base": {
            "apt_proxy": "http://192.0.2.80",
            "apt_mirror": "https://192.0.2.90/debian",
            "ntp_servers": ["192.0.2.123"],
        },
        "firewall": {"egress": {"enabled": True, "dns_cidrs": ["192.0.2.53", "2001:db8::53"]}},
    }
    ruleset = firewall.render_ruleset(load_host(tmp_path, data), 22)
    dns = "firewall.egress.dns_cidrs"
    assert named(chain(ruleset, "output")) == [
        f'ip daddr {{ 192.0.2.53/32 }} udp dport {{ 53 }} accept comment "{dns}"',
        f'ip6 daddr {{ 2001:db8::53/128 }} udp dport {{ 53 }} accept comment "{dns}"',
        f'ip daddr {{ 192.0.2.53/32 }} tcp dport {{ 53 }} accept comment "{dns}"',
        f'ip6 daddr {{ 2001:db8::53/128 }} tcp dport {{ 53 }} accept comment "{dns}"',
        'ip daddr { 192.0.2.123/32 } udp dport { 123 } accept comment "base.ntp_servers"',
        'ip daddr { 192.0.2.80/32 } tcp dport { 80 } accept comment "base.apt_proxy"',
    ]
    nft_accepts(ruleset)


# --- the gateway rule on an upstream ------------------------------------------------------------

GW4, GW6, UP = "192.0.2.31", "2001:db8::32", "192.0.2.41"


def fleet() -> dict[str, Any]:
    """Two gateway hosts (one reached over IPv4, one over IPv6) in front of one node that
    serves two llama.cpp services (chat 8080, embed 8081); firewall on, egress on at the
    gateways."""
    model = {"uri": "file:///models/m.gguf", "sha256": "a" * 64}
    services = {
        "chat": {"runtime": "llamacpp", "port": 8080, "model": model},
        "embed": {"runtime": "llamacpp", "port": 8081, "model": {**model, "served_name": "emb"}},
    }
    client = {"key": {"path": "gpunode/clients/alice"}, "models": ["chat", "emb"]}
    return {
        "defaults": {
            "distro": "debian12",
            "network": {k: v for k, v in NETWORK.items() if k != "cluster_cidrs"},
            "vault": {"addr": "http://127.0.0.1:1", "role_id": "r"},
            "inference": {
                "runtimes": {"llamacpp": {"method": "package", "package": "llama", "version": "1"}}
            },
        },
        "groups": {
            "gateways": {
                "data": {
                    "gateway": {
                        "enabled": True,
                        "upstreams": [HOST],
                        "clients": {"alice": client},
                    },
                    "base": {"apt_proxy": "http://192.0.2.80:3128", "ntp_servers": ["192.0.2.6"]},
                    "firewall": {"egress": {"enabled": True, "dns_cidrs": []}},
                }
            },
            "nodes": {"data": {"inference": {"services": services}}},
        },
        "hosts": {
            "gw-01": {"connection": {"address": GW4}, "groups": ["gateways"]},
            "gw-02": {"connection": {"address": GW6}, "groups": ["gateways"]},
            HOST: {"connection": {"address": UP}, "groups": ["nodes"]},
        },
    }


def test_an_upstream_opens_the_fronted_ports_to_its_gateways_only(tmp_path: Path) -> None:
    """The services the same gateways front share one rule, per address family; the
    clients' network.app_cidrs reach neither port."""
    hosts = load_file(write(tmp_path, fleet())).hosts
    config = hosts[HOST].config
    assert config.gateway_sources == {"chat": (GW4, GW6), "embed": (GW4, GW6)}
    ruleset = firewall.render_ruleset(config, 22)
    assert named(chain(ruleset, "input")) == [
        'ip saddr { 192.0.2.0/24 } tcp dport { 22 } accept comment "ssh"',
        'ip6 saddr { 2001:db8:a::/48 } tcp dport { 22 } accept comment "ssh"',
        'ip saddr { 203.0.113.0/28 } tcp dport { 9100, 9400 } accept comment "metrics"',
        'ip saddr { 192.0.2.31/32 } tcp dport { 8080, 8081 } accept comment "gateway"',
        'ip6 saddr { 2001:db8::32/128 } tcp dport { 8080, 8081 } accept comment "gateway"',
    ]
    nft_accepts(ruleset)
    # and each gateway may reach the upstream's ports with egress on
    out = named(chain(firewall.render_ruleset(hosts["gw-01"].config, 22), "output"))
    assert (
        'ip daddr { 192.0.2.41/32 } tcp dport { 8080, 8081 } accept comment "gateway.upstreams"'
        in out
    )


# --- the rollback, run ---------------------------------------------------------------------------

FAKE_SYSTEMCTL = """#!/bin/sh
echo "systemctl $*" >> "$CALLS"
case "$1" in
    is-active) [ -e "$ARMED" ] ;;
    *) exit 0 ;;
esac
"""
FAKE_SYSTEMD_RUN = """#!/bin/sh
echo "systemd-run $*" >> "$CALLS"
"""


class Node:
    """A network namespace of its own with the real nft, fake systemctl/systemd-run that
    record their calls, and gpunode's firewall directory moved into a temporary one."""

    def __init__(self, tmp_path: Path) -> None:
        need_root("running the rollback against the real nft (in a network namespace)")
        for tool in ("nft", "unshare", "sh"):
            if not shutil.which(tool):
                pytest.fail(f"{tool} is needed (apt-get install nftables util-linux)")
        self.dir = tmp_path / "firewall"
        self.dir.mkdir()
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        for name, text in (("systemctl", FAKE_SYSTEMCTL), ("systemd-run", FAKE_SYSTEMD_RUN)):
            (self.bin / name).write_text(text)
            (self.bin / name).chmod(stat.S_IRWXU)
        self.calls = tmp_path / "calls"
        self.armed = tmp_path / "armed"
        self.rollback = self.dir / "rollback.nft"

    def run(self, script: str) -> subprocess.CompletedProcess[str]:
        """``script`` (with the firewall directory moved) by a real sh, in a fresh namespace."""
        script = script.replace(firewall.FIREWALL_DIR, str(self.dir))
        env = dict(
            os.environ,
            PATH=f"{self.bin}:{os.environ['PATH']}",
            CALLS=str(self.calls),
            ARMED=str(self.armed),
        )
        return subprocess.run(
            ["unshare", "--net", "sh", "-c", script],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def recorded(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []


def arm() -> str:
    return firewall.arm_rollback_command(45)


def test_the_rollback_restores_the_table_that_was_running(tmp_path: Path) -> None:
    """Armed over a running table: the saved script, loaded after another ruleset (what the
    timer does), brings the running table back, and the timer is armed for it."""
    node = Node(tmp_path)
    config = load_host(tmp_path, EVERY_KIND)
    confirmed = firewall.render_ruleset(config, 22)
    (tmp_path / "confirmed.nft").write_text(confirmed)
    tried = confirmed.replace("tcp dport { 22 }", "tcp dport { 22, 2222 }")
    (tmp_path / "tried.nft").write_text(tried)
    listing = "nft list table inet gpunode"
    done = node.run(
        f"nft -f {tmp_path}/confirmed.nft && {listing} > {tmp_path}/before && ( {arm()} ) && "
        f"nft -f {tmp_path}/tried.nft && {listing} > {tmp_path}/tried && "
        f"nft -f {node.rollback} && {listing} > {tmp_path}/after"
    )
    assert done.returncode == 0, done.stderr
    before = (tmp_path / "before").read_text()
    assert "2222" in (tmp_path / "tried").read_text() and "2222" not in before
    assert (tmp_path / "after").read_text() == before
    assert node.rollback.read_text().startswith(
        "table inet gpunode\ndelete table inet gpunode\ntable inet gpunode {\n"
    )
    assert not (node.dir / "rollback.nft.tmp").exists()
    timer = "gpunode-firewall-rollback.timer"
    assert node.recorded() == [
        f"systemctl is-active --quiet {timer}",
        f"systemctl stop {timer}",
        f"systemctl reset-failed {timer} gpunode-firewall-rollback.service",
        "systemd-run --quiet --unit=gpunode-firewall-rollback --on-active=45s "
        "--timer-property=AccuracySec=1s --description=gpunode: restore the previous firewall "
        f"/usr/sbin/nft -f {node.rollback}",
    ]


def test_without_a_table_the_rollback_deletes_the_new_one(tmp_path: Path) -> None:
    node = Node(tmp_path)
    ruleset = firewall.render_ruleset(load_host(tmp_path, {}), 22)
    (tmp_path / "new.nft").write_text(ruleset)
    done = node.run(
        f"( {arm()} ) && nft -f {tmp_path}/new.nft && nft -f {node.rollback} && "
        f"nft list tables > {tmp_path}/after"
    )
    assert done.returncode == 0, done.stderr
    assert node.rollback.read_text() == "table inet gpunode\ndelete table inet gpunode\n"
    assert (tmp_path / "after").read_text() == ""


def test_an_armed_rollback_keeps_the_table_it_saved(tmp_path: Path) -> None:
    """An earlier run armed the rollback and never confirmed: its saved table (the last
    confirmed one) is kept, not replaced by what that run loaded; an empty saved file is
    no saved table."""
    node = Node(tmp_path)
    saved = "table inet gpunode\ndelete table inet gpunode\n"
    node.rollback.write_text(saved)
    node.armed.touch()
    ruleset = firewall.render_ruleset(load_host(tmp_path, {}), 22)
    (tmp_path / "new.nft").write_text(ruleset)
    done = node.run(f"nft -f {tmp_path}/new.nft && {arm()}")
    assert done.returncode == 0, done.stderr
    assert node.rollback.read_text() == saved
    assert node.recorded()[-1].startswith("systemd-run ")
    node.rollback.write_text("")
    done = node.run(f"nft -f {tmp_path}/new.nft && {arm()}")
    assert done.returncode == 0, done.stderr
    assert node.rollback.read_text().startswith(saved + "table inet gpunode {\n")


def test_a_saved_table_nft_refuses_arms_nothing(tmp_path: Path) -> None:
    """The saved script is checked with nft -c before the timer is armed: a broken one stops
    the command (the role then loads nothing), and no timer is stopped or started."""
    node = Node(tmp_path)
    node.rollback.write_text("table inet gpunode { chain input { policy maybe; } }\n")
    node.armed.touch()
    done = node.run(arm())
    assert done.returncode != 0
    assert node.recorded() == ["systemctl is-active --quiet gpunode-firewall-rollback.timer"]


# --- controller_source, sha1 --------------------------------------------------------------------


def test_controller_source_tries_the_next_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name with two addresses, the first unusable (a UDP socket may not connect to the
    broadcast address without SO_BROADCAST: EACCES): the second one answers."""
    real = socket.getaddrinfo
    udp = (socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP, "")

    def two(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        assert host == "both.test" and port == 22 and kwargs == {"type": socket.SOCK_DGRAM}
        return [(*udp, ("255.255.255.255", port)), *real("127.0.0.2", port, *args, **kwargs)]

    monkeypatch.setattr(socket, "getaddrinfo", two)
    with socket.socket(*udp[:3]) as sock, pytest.raises(OSError):
        sock.connect(("255.255.255.255", 22))
    assert str(firewall.controller_source("both.test", 22)) == "127.0.0.1"


def test_sha1_is_the_sha1sum_of_the_text(tmp_path: Path) -> None:
    text = 'table inet gpunode {\n\tchain input { comment "\u00e9" }\n}\n'
    path = tmp_path / "ruleset.nft"
    path.write_text(text, encoding="utf-8")
    real = subprocess.run(["sha1sum", str(path)], capture_output=True, text=True, check=True)
    assert firewall.sha1(text) == real.stdout.split()[0]
