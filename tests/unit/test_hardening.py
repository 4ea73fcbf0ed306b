"""The firewall and hardening roles (roles/firewall.py, roles/hardening.py) and their config.

Config checks go through gpunode's real loader. The nftables ruleset is checked by the real
``nft -c`` of this machine in a network namespace of its own (nothing of this machine's
firewall is read or changed). The roles run through pyinfra's real API against one host of
the ``@fake`` connector for every distro gpunode supports (see harness.py for the
harness), fed with outputs recorded on real hosts in ``fixtures/hardening/``:

* ``firewall-state.converged``, ``sshd-state.converged``, ``sysctl-network.converged``,
  ``writable-sysctls.nspawn``: the facts' commands on a converged lab host (Debian 12 in
  systemd-nspawn); the tests put the sha1 of their own config's ruleset/drop-in in place of
  the recorded one where a converged host of *that* config is meant.
* ``firewall-state.fresh``: the FirewallState command on a Debian 12 machine with nftables
  installed and no gpunode table (run in a fresh network namespace).
* ``sshd-state.fresh``: the SshdState command on the lab's freshly debootstrapped Debian 12
  root (stock openssh-server ``sshd_config``). Ubuntu 22.04/24.04 and EL9 ship the same
  ``Include /etc/ssh/sshd_config.d/*.conf`` line at the top of theirs.
* ``writable-sysctls.controller``: the WritableSysctls command on a non-container machine.
* ``login-defs.fresh``, ``password-accounts.fresh``: the KeyValues command on /etc/login.defs
  and the PasswordAccounts command on the lab's freshly debootstrapped Debian 12 root (no
  account has a password there: the output is empty).
* ``grub-linux.stock``, ``grub-linux.gpunode``: AuditBoot's grep (grub-mkconfig's header, the
  ``linux`` lines) over the /boot/grub/grub.cfg that Debian 12's real ``update-grub`` (grub
  2.06-13+deb12u2, installed with apt in a chroot of the lab's debootstrapped root on a
  loop-mounted partition, Debian's 6.1.0-57 kernel in /boot) made without, then with,
  ``grub-dropin.recorded`` in /etc/default/grub.d (2026-12-06).
* ``grub-linux.override``: the same, made with gpunode's drop-in and a site's
  ``70-site.cfg`` after it (``GRUB_CMDLINE_LINUX_DEFAULT="quiet audit=0"``) (2026-12-06).
* ``proc-cmdline.plain``, ``proc-cmdline.audit``: /proc/cmdline of Debian 12's kernel booted
  under QEMU without and with AUDIT_BOOT_ARGS (test_audit.py's VM, 2026-12-06).
"""

from __future__ import annotations

import io
import ipaddress
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from harness import (
    ALL,
    APT,
    DNF,
    Handler,
    RecordingFakeConnector,
    Response,
    Run,
    content_lines,
    converged,
    fake_clock,
    host_info_output,
    need_root,
    nft_check,
    run_deploys,
)
from pydantic import BaseModel
from pyinfra.api import OperationValueError
from pyinfra.facts.files import Directory
from pyinfra.facts.server import Sysctl

from gpunode import firewall as firewall_rules
from gpunode import hardening
from gpunode.config import load
from gpunode.facts.firewall import FirewallState
from gpunode.facts.hardening import (
    AuditBoot,
    KeyValues,
    PasswordAccounts,
    PrimaryGroup,
    SshdState,
    WritableSysctls,
)
from gpunode.facts.server import HostInfo
from gpunode.operations import firewall as confirm_ops
from gpunode.paths import REPO_ROOT
from gpunode.schema import hardening as hardening_schema
from gpunode.schema.hardening import Hardening
from gpunode.schema.node import Connection, NodeConfig
from gpunode.schema.types import ConfigError
from roles.firewall import firewall
from roles.hardening import file_integrity
from roles.hardening import hardening as hardening_role

FIXTURES = Path(__file__).parent / "fixtures" / "hardening"
HOST = "gpu-01"
ADMIN = ["10.20.0.0/16", "fd00:20::/48"]
APP = ["10.30.0.0/16"]
MONITORING = ["10.40.0.0/24"]


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# What every node of these tests serves needs its CIDRs with the firewall on (the default):
# SSH (admin_cidrs, covering this machine: hosts are 127.0.0.2) and the exporters.
NETWORK = {"admin_cidrs": ["127.0.0.0/8"], "monitoring_cidrs": MONITORING}


def load_one(data: dict[str, Any], address: str = "127.0.0.2", user: str = "root") -> NodeConfig:
    raw = {
        "defaults": {"distro": "debian12", "network": NETWORK, **data},
        "hosts": {HOST: {"connection": {"address": address, "user": user}}},
    }
    return load(raw, source="test_hardening").hosts[HOST].config


def config(distro: str = "debian12", **firewall: Any) -> NodeConfig:
    data = {
        "distro": distro,
        "network": {
            "admin_cidrs": [*ADMIN, "127.0.0.0/8"],
            "app_cidrs": APP,
            "monitoring_cidrs": MONITORING,
        },
        "firewall": {"enabled": True, **firewall},
    }
    return load_one(data)


def config_error(data: dict[str, Any], **kw: Any) -> str:
    with pytest.raises(ConfigError) as exc:
        load_one(data, **kw)
    return str(exc.value)


# --- config checks at load ------------------------------------------------------------


def test_firewall_is_on_by_default() -> None:
    """Finding 1: a node is closed unless the inventory says otherwise."""
    cfg = load_one({})
    assert cfg.firewall.enabled is True
    assert "policy drop" in chain(firewall_rules.render_ruleset(cfg, 22), "input")[0]


def test_empty_admin_cidrs_with_the_firewall_on_is_refused() -> None:
    message = config_error({"network": {}})
    assert (
        "test_hardening: host gpu-01: network.admin_cidrs: empty while the firewall is on "
        "(firewall.enabled defaults to true)"
    ) in message
    assert "allowed: the CIDRs SSH comes from" in message
    assert "or firewall.enabled: false" in message


MODEL = {"uri": "file:///srv/models/m.gguf", "sha256": "a" * 64}
NO_EXPORTERS = {"node_exporter": False, "dcgm_exporter": False}
SERVICES = {
    "monitoring_cidrs": ({}, "metrics exporters (monitoring.*) on tcp/9100, tcp/9400"),
    "app_cidrs": (
        {
            "monitoring": NO_EXPORTERS,
            "inference": {
                "services": {"chat": {"runtime": "llamacpp", "port": 8000, "model": MODEL}}
            },
        },
        "inference services (inference.services) on tcp/8000",
    ),
    "cluster_cidrs": (
        {
            "monitoring": NO_EXPORTERS,
            "nomad": {
                "enabled": True,
                "version": "1.10.5",
                "servers": ["10.0.0.10:4647"],
                "device_plugin": {"sha256": "a" * 64},
            },
        },
        "the Nomad client (nomad.enabled) on tcp/4646, tcp/4647",
    ),
}


@pytest.mark.parametrize("key", sorted(SERVICES))
def test_a_service_without_its_cidrs_is_refused(key: str) -> None:
    """Finding 1: a node that serves something says who may reach it, or turns the firewall
    off explicitly; `[]` closes the ports to every address. (check_host is what config load
    runs for each host; monitoring_cidrs goes through the whole loader below.)"""
    data, what = SERVICES[key]
    connection = Connection(address="192.0.2.10")

    def problems(**extra: Any) -> list[str]:
        cfg = NodeConfig.model_validate({"distro": "debian12", **data, **extra})
        return firewall_rules.check_host("inv.yml: host gpu-01", cfg, connection)

    admin = {"admin_cidrs": ["192.0.2.0/28"]}
    (message,) = problems(network=admin)
    assert message.startswith(f"inv.yml: host gpu-01: network.{key}: not set while the node ")
    assert f"serves {what} and the firewall is on (allowed: the CIDRs that may reach them" in (
        message
    )
    assert "[] to close them to every address; or firewall.enabled: false" in message
    assert problems(network={**admin, key: []}) == []
    assert problems(network={**admin, key: ["10.0.0.0/8"]}) == []
    assert problems(firewall={"enabled": False}) == []


def test_exporters_without_monitoring_cidrs_are_refused_at_load() -> None:
    message = config_error({"network": {"admin_cidrs": ["127.0.0.0/8"]}})
    assert "test_hardening: host gpu-01: network.monitoring_cidrs: not set while the node" in (
        message
    )
    assert load_one({"network": {"admin_cidrs": ["127.0.0.0/8"], "monitoring_cidrs": []}})


def test_a_disabled_firewall_is_printed_on_every_run(capsys: pytest.CaptureFixture[str]) -> None:
    from gpunode.inventory import from_dict

    raw = {
        "defaults": {"distro": "debian12", "firewall": {"enabled": False}},
        "hosts": {
            "gpu-01": {"connection": {"address": "192.0.2.1"}},
            "gpu-02": {"connection": {"address": "192.0.2.2"}},
            "gpu-03": {
                "connection": {"address": "192.0.2.3"},
                "data": {"firewall": {"enabled": True}, "network": NETWORK},
            },
        },
    }
    from_dict(raw, "fw-off.yml")
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "firewall" in line] == [
        "gpunode: warning: firewall.enabled is false: no gpunode firewall, every port these "
        "nodes listen on answers any address (hosts: gpu-01, gpu-02)"
    ]


def test_admin_cidrs_that_exclude_the_controller_are_refused() -> None:
    # 127.0.0.2 is reached from 127.0.0.1 on every machine: no route lookup to guess.
    message = config_error(
        {"network": {"admin_cidrs": ["10.0.0.0/8"]}, "firewall": {"enabled": True}}
    )
    assert "host gpu-01: network.admin_cidrs: this controller reaches 127.0.0.2 from 127.0.0.1" in (
        message
    )
    assert "firewall.force_admin_cidrs: true" in message


def test_forcing_admin_cidrs_loads_the_config() -> None:
    data = {
        "network": {**NETWORK, "admin_cidrs": ["10.0.0.0/8"]},
        "firewall": {"force_admin_cidrs": True},
    }
    assert load_one(data).firewall.force_admin_cidrs is True


def test_admin_cidrs_that_cover_the_controller_pass() -> None:
    assert load_one({"network": {**NETWORK, "admin_cidrs": ["127.0.0.0/8"]}}).firewall.enabled


def test_controller_source_is_the_kernels_choice() -> None:
    assert firewall_rules.controller_source("127.0.0.2", 22) == ipaddress.ip_address("127.0.0.1")
    assert firewall_rules.controller_source("no-such-host.invalid", 22) is None


def test_permit_root_login_no_while_connecting_as_root_is_refused() -> None:
    data = {"hardening": {"ssh": {"permit_root_login": "no"}}}
    message = config_error(data)
    assert "hardening.ssh.permit_root_login: 'no' but gpunode connects as root" in message
    assert load_one(data, user="alice").hardening.ssh.permit_root_login == "no"


@pytest.mark.parametrize(
    "data, key, allowed",
    [
        (
            {"firewall": {"rollback_seconds": 5}},
            "firewall.rollback_seconds",
            "a number at least 20",
        ),
        ({"firewall": {"log_rate": "lots"}}, "firewall.log_rate", "'lots' is not allowed"),
        (
            {"firewall": {"extra_input": [{"name": "x", "port": 80, "cidrs": []}]}},
            "firewall.extra_input[0].cidrs",
            "a list of at least 1 item(s)",
        ),
        (
            {
                "firewall": {
                    "extra_input": [
                        {"name": "x", "port": 80, "proto": "sctp", "cidrs": ["10.0.0.0/8"]}
                    ]
                }
            },
            "firewall.extra_input[0].proto",
            "'tcp', 'udp'",
        ),
        (
            {"hardening": {"ssh": {"max_auth_tries": 0}}},
            "hardening.ssh.max_auth_tries",
            "at least 1",
        ),
        ({"hardening": {"sysctl": {"not a key": 1}}}, "hardening.sysctl", "not a key"),
        ({"hardening": {"ssh": {"ciphers": []}}}, "hardening.ssh.ciphers", "at least 1"),
    ],
)
def test_bad_values_name_the_key(data: dict[str, Any], key: str, allowed: str) -> None:
    message = config_error(data)
    assert f"host gpu-01 (merged): {key}" in message or f"defaults: {key}" in message, message
    assert allowed in message


def test_an_extra_rule_on_the_ssh_port_is_refused() -> None:
    message = config_error(
        {
            "network": {"admin_cidrs": ["127.0.0.0/8"]},
            "firewall": {
                "enabled": True,
                "extra_input": [{"name": "sneaky", "port": 22, "cidrs": ["0.0.0.0/0"]}],
            },
        }
    )
    assert "firewall.extra_input: rule sneaky: port 22 is the SSH port" in message


# --- the ruleset ---------------------------------------------------------------------------


def chain(ruleset: str, name: str) -> list[str]:
    body = re.search(rf"\tchain {name} {{\n(.*?)\n\t}}", ruleset, re.S)
    assert body, ruleset
    return [line.strip() for line in body[1].splitlines() if line.strip() and "#" not in line]


@pytest.mark.parametrize("containers", [False, True])
def test_ruleset_passes_nft_check(containers: bool) -> None:
    ruleset = firewall_rules.render_ruleset(
        config(
            containers=containers,
            extra_input=[{"name": "probe", "proto": "udp", "port": 5353, "cidrs": ADMIN}],
        ),
        22,
    )
    proc = nft_check(ruleset)
    assert proc.returncode == 0, proc.stderr


def test_nft_check_catches_a_broken_ruleset() -> None:
    proc = nft_check(
        firewall_rules.render_ruleset(config(), 22).replace("policy drop", "policy maybe")
    )
    assert proc.returncode != 0


def test_ruleset_replaces_only_gpunode_table() -> None:
    ruleset = firewall_rules.render_ruleset(config(), 22)
    assert not [line for line in ruleset.splitlines() if "flush" in line and "#" not in line]
    statements = [line for line in ruleset.splitlines() if line and line[0] not in "#\t}"]
    assert statements == [
        "table inet gpunode",
        "delete table inet gpunode",
        "table inet gpunode {",
    ]


def test_input_chain() -> None:
    rules = chain(firewall_rules.render_ruleset(config(), 2222), "input")
    assert rules[0] == "type filter hook input priority filter; policy drop;"
    assert rules[1:4] == [
        'iifname "lo" accept',
        "ct state established,related accept",
        "ct state invalid drop",
    ]
    assert (
        "ip protocol icmp icmp type echo-request limit rate 10/second burst 20 packets accept"
        in (rules)
    )
    nd = [r for r in rules if "nd-neighbor-solicit" in r]
    assert nd and all("ip6 hoplimit 255 accept" in r for r in nd)
    # SSH (the connection's port) from the admin CIDRs, per family; nothing else on 2222
    assert 'ip saddr { 10.20.0.0/16, 127.0.0.0/8 } tcp dport { 2222 } accept comment "ssh"' in rules
    assert 'ip6 saddr { fd00:20::/48 } tcp dport { 2222 } accept comment "ssh"' in rules
    # metrics ports (gpunode.monitoring.metrics_ports) from the monitoring CIDRs only
    from gpunode.monitoring import metrics_ports

    ports = sorted(p for _, p in metrics_ports(config()))
    assert ports, "monitoring exposes metrics ports by default"
    metrics = [r for r in rules if r.endswith('comment "metrics"')]
    assert metrics == [
        f"ip saddr {{ 10.40.0.0/24 }} tcp dport {{ {', '.join(map(str, ports))} }} accept "
        'comment "metrics"'
    ]
    assert (
        rules[-1]
        == 'limit rate 5/minute burst 10 packets log prefix "gpunode-drop input: " level info'
    )


def test_no_log_rule_when_logging_is_off() -> None:
    assert "log prefix" not in firewall_rules.render_ruleset(config(log_drops=False), 22)


def test_forward_policy_without_containers_drops_everything() -> None:
    rules = chain(firewall_rules.render_ruleset(config(), 22), "forward")
    assert rules[0] == "type filter hook forward priority filter; policy drop;"
    assert [r for r in rules[1:] if "accept" in r] == []


def test_forward_policy_with_containers_passes_published_ports_only_from_their_sources() -> None:
    cfg = config(
        containers=True,
        extra_input=[{"name": "api", "port": 8000, "cidrs": ["192.0.2.0/24"]}],
    )
    rules = chain(firewall_rules.render_ruleset(cfg, 22), "forward")
    assert rules[0].endswith("policy drop;")
    assert 'iifname { "docker0", "br-*", "cni*", "nomad", "podman*" } accept' in rules
    assert (
        "ct status dnat meta l4proto tcp ct original proto-dst { 8000 } "
        'ip saddr { 192.0.2.0/24 } accept comment "api"'
    ) in rules
    assert not [r for r in rules if 'comment "ssh"' in r]  # SSH is the node's, never forwarded
    # and forwarding is on, with loose reverse-path filtering
    values = hardening.sysctl_settings(cfg)
    assert values["net.ipv4.ip_forward"] == 1
    assert values["net.ipv6.conf.all.forwarding"] == 1
    assert values["net.ipv4.conf.all.rp_filter"] == 2


def test_dhcpv6_replies_from_link_local_are_accepted() -> None:
    """Finding 15: DHCPv6 replies (udp 547 -> 546) come from a link-local address to the
    client's, untracked (the request went to ff02::1:2): accepted, from link-local only."""
    rules = chain(firewall_rules.render_ruleset(config(), 22), "input")
    assert "ip6 saddr fe80::/10 udp sport 547 udp dport 546 accept" in rules
    assert not [r for r in rules if "546" in r and "fe80::/10" not in r]


def test_output_accepts_everything_unless_egress_is_on() -> None:
    ruleset = firewall_rules.render_ruleset(config(), 22)
    assert chain(ruleset, "output") == ["type filter hook output priority filter; policy accept;"]
    assert "counter" not in ruleset


EGRESS = {
    "enabled": True,
    "addresses": {"Time.Example.NET": ["192.0.2.64/28", "2001:db8:1::/64"]},
    "extra": [{"name": "models", "port": 443, "cidrs": ["203.0.113.0/24"]}],
}


def egress_config(**egress: Any) -> NodeConfig:
    return load_one(
        {
            "base": {
                "apt_proxy": "http://192.0.2.80:3128",
                "ntp_servers": ["192.0.2.123", "time.example.net"],
            },
            "vault": {"addr": "https://[2001:db8::8]:8200"},
            "firewall": {"egress": {**EGRESS, **egress}},
        }
    )


def test_egress_allows_only_what_the_node_needs_and_counts_the_rest() -> None:
    ruleset = firewall_rules.render_ruleset(egress_config(), 22)
    rules = chain(ruleset, "output")
    assert rules[:4] == [
        "type filter hook output priority filter; policy drop;",
        'oifname "lo" accept',
        "ct state established,related accept",
        "ct state invalid drop",
    ]
    allowed = [r for r in rules if "comment" in r]
    assert allowed == [
        'ip daddr { 0.0.0.0/0 } udp dport { 53 } accept comment "firewall.egress.dns_cidrs"',
        'ip6 daddr { ::/0 } udp dport { 53 } accept comment "firewall.egress.dns_cidrs"',
        'ip daddr { 0.0.0.0/0 } tcp dport { 53 } accept comment "firewall.egress.dns_cidrs"',
        'ip6 daddr { ::/0 } tcp dport { 53 } accept comment "firewall.egress.dns_cidrs"',
        "ip daddr { 192.0.2.123/32, 192.0.2.64/28 } udp dport { 123 } accept "
        'comment "base.ntp_servers"',
        'ip6 daddr { 2001:db8:1::/64 } udp dport { 123 } accept comment "base.ntp_servers"',
        'ip daddr { 192.0.2.80/32 } tcp dport { 3128 } accept comment "base.apt_proxy"',
        'ip6 daddr { 2001:db8::8/128 } tcp dport { 8200 } accept comment "vault.addr"',
        'ip daddr { 203.0.113.0/24 } tcp dport { 443 } accept comment "models"',
    ]
    # DHCP/DHCPv6 requests and neighbour discovery leave; the rest is counted, logged, dropped
    assert "ip6 daddr ff02::1:2 udp sport 546 udp dport 547 accept" in rules
    assert "udp sport 68 udp dport 67 accept" in rules
    assert rules[-2:] == [
        'counter name "egress_dropped"',
        'limit rate 5/minute burst 10 packets log prefix "gpunode-drop output: " level info',
    ]
    assert "\tcounter egress_dropped {\n\t}\n" in ruleset
    proc = nft_check(ruleset)
    assert proc.returncode == 0, proc.stderr


def test_egress_without_a_proxy_opens_the_mirrors() -> None:
    cfg = load_one(
        {
            "base": {"apt_mirror": "https://192.0.2.90/debian", "ntp_servers": ["192.0.2.123"]},
            "firewall": {"egress": {"enabled": True, "dns_cidrs": ["192.0.2.53/32"]}},
        }
    )
    rules = [r for r in chain(firewall_rules.render_ruleset(cfg, 22), "output") if "comment" in r]
    assert 'ip daddr { 192.0.2.90/32 } tcp dport { 443 } accept comment "base.apt_mirror"' in rules
    assert [r for r in rules if "dport { 53 }" in r] == [
        'ip daddr { 192.0.2.53/32 } udp dport { 53 } accept comment "firewall.egress.dns_cidrs"',
        'ip daddr { 192.0.2.53/32 } tcp dport { 53 } accept comment "firewall.egress.dns_cidrs"',
    ]


def test_egress_refuses_names_without_addresses_and_unknown_mirrors() -> None:
    message = config_error(
        {
            "base": {"ntp_servers": ["0.debian.pool.ntp.org"]},
            "vault": {"addr": "https://vault.example.com:8200"},
            "firewall": {"egress": {"enabled": True}},
        }
    )
    assert (
        "test_hardening: host gpu-01: firewall.egress.enabled: the node would fetch packages from "
        "its distro's default mirrors, whose addresses no rule can hold (allowed: set "
        "base.apt_proxy, or a mirror URL such as base.apt_mirror)"
    ) in message
    assert (
        "test_hardening: host gpu-01: firewall.egress.addresses: 0.debian.pool.ntp.org "
        "(base.ntp_servers) is a DNS name and nft rules hold addresses; gpunode does not resolve "
        "it (allowed: list its CIDRs, e.g. 0.debian.pool.ntp.org: [192.0.2.50/32], or give the "
        "server by IP address)"
    ) in message
    assert "firewall.egress.addresses: vault.example.com (vault.addr)" in message
    empty = config_error({"firewall": {"egress": {"enabled": True, "addresses": {"a.b": []}}}})
    assert "firewall.egress.addresses: no CIDR for a.b (allowed: at least one" in empty


# --- sshd and sysctl data --------------------------------------------------------------------


def test_sshd_dropin_options() -> None:
    text = hardening.render_sshd(config(), "root", "root")
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    options = dict(line.split(" ", 1) for line in lines)
    assert len(options) == len(lines)  # each option once
    assert options["AllowGroups"] == "gpunode_admins root"
    assert options["PasswordAuthentication"] == "no"
    assert options["KbdInteractiveAuthentication"] == "no"
    assert options["PermitRootLogin"] == "prohibit-password"
    assert options["X11Forwarding"] == options["AllowTcpForwarding"] == "no"
    assert options["AllowAgentForwarding"] == options["PermitTunnel"] == "no"
    assert options["LogLevel"] == "VERBOSE"
    assert options["MaxAuthTries"] == "2"
    assert options["LoginGraceTime"] == "30"
    assert options["ClientAliveInterval"] == "300"
    assert not re.search(r"cbc|sha1|md5|group1-|group14-sha1", text)
    assert options["Ciphers"].split(",")[0] == "chacha20-poly1305@openssh.com"
    assert hardening.render_sshd(config(), "alice", "alice").count("PermitRootLogin no") == 1


def test_sshd_allow_groups() -> None:
    """Finding 15: sshd lets in only the admin group, the connection user's primary group,
    admin users without sudo (their own group) and hardening.ssh.allow_groups."""
    cfg = load_one(
        {
            "firewall": {"enabled": False},
            "base": {
                "admin_group": "ops",
                "admin_users": [
                    {"name": "alice"},
                    {"name": "watch-er", "sudo": False},
                ],
            },
            "hardening": {"ssh": {"allow_groups": ["backup", "ops"]}},
        },
        user="deploy",
    )
    text = hardening.render_sshd(cfg, "deploy", "deployers")
    (line,) = [x for x in text.splitlines() if x.startswith("AllowGroups")]
    assert line == "AllowGroups ops deployers watch-er backup"


@pytest.mark.parametrize("group", ["", "*", "a,b", "!root", "wheel admins", "-x"])
def test_sshd_refuses_a_connection_group_that_is_a_pattern(group: str) -> None:
    with pytest.raises(ValueError, match=r"primary group .* \(allowed: "):
        hardening.render_sshd(config(), "root", group)


def test_a_host_reporting_a_pattern_as_the_group_fails_before_sshd_is_touched() -> None:
    responses = {**fresh_responses("debian12"), PrimaryGroup().command("root"): "*"}
    run = run_roles(config(), "debian12", responses)
    assert run.failed
    assert any("sshd AllowGroups" in out.stderr for _, ok, out in run.results if not ok)
    assert hardening.SSHD_STAGED not in run.files and not run.grep(r"sshd -t")


SUDO_STAGED = "/etc/sudoers.d/.99-gpunode-hardening.gpunode-new"


def test_sudo_defaults_dropin() -> None:
    """Finding 15: use_pty and a log file, through visudo before the drop-in takes effect."""
    run = run_roles(config(), "debian12", fresh_responses("debian12"))
    assert content_lines(run.files[SUDO_STAGED]) == [
        "Defaults use_pty",
        'Defaults logfile="/var/log/sudo.log"',
        "Defaults loglinelen=0",  # one line per command in the log file
    ]
    assert hardening.SUDO_DROPIN not in run.files
    (script,) = run.grep(rf"visudo -c -f {re.escape(SUDO_STAGED)}")
    assert script.index("visudo -c -f") < script.index(f"mv -f {SUDO_STAGED}")
    off = load_one(
        {"firewall": {"enabled": False}, "hardening": {"sudo": {"use_pty": False, "logfile": None}}}
    )
    assert content_lines(hardening.render_sudo_defaults(off)) == []


def test_sysctl_overrides_add_and_drop_keys() -> None:
    cfg = load_one({"hardening": {"sysctl": {"kernel.sysrq": None, "net.ipv4.tcp_timestamps": 0}}})
    values = hardening.sysctl_settings(cfg)
    assert "kernel.sysrq" not in values
    assert values["net.ipv4.tcp_timestamps"] == 0
    assert values["kernel.randomize_va_space"] == 2
    text = hardening.render_sysctl(cfg)
    assert "net.ipv4.tcp_timestamps = 0\n" in text and "kernel.sysrq" not in text


# --- the roles on a fake host, every distro -----------------------------------------------


def lines(name: str, **replace: str) -> list[str]:
    out = []
    for line in fixture(name).splitlines():
        key = line.partition("=")[0]
        out.append(f"{key}={replace[key]}" if key in replace else line)
    return out


class SharedLogConnector(RecordingFakeConnector):
    """The recording fake connector; a second connection to the same host (the firewall's
    confirmation opens one) logs its commands into the first one's list, in order."""

    first: dict[str, RecordingFakeConnector] = {}

    def __init__(self, state, host) -> None:
        super().__init__(state, host)
        first = self.first.setdefault(host.name, self)
        if first is not self and first.state is state:
            self.executed_commands = first.executed_commands
            self.results = first.results
        else:
            self.first[host.name] = self


def run_roles(
    cfg: NodeConfig,
    distro: str,
    responses: dict[Any, Response],
    handlers: Iterable[Handler] = (),
    container: str = "",
    host_data: dict[str, Any] | None = None,
    deploys: Iterable[Any] = (firewall, hardening_role),
) -> Run:
    responses = {HostInfo().command(): list(host_info_output(distro, container)), **responses}
    return run_deploys(
        cfg, responses, deploys, handlers, SharedLogConnector, HOST, host_data=host_data
    )


def audit_boot(
    running: str, grub: str | None, update_grub: bool = True, by_hand: bool = False
) -> list[str]:
    """The AuditBoot fact's output: whether ``update-grub`` is there, the running kernel's
    command line (``proc-cmdline.*``) and the header and ``linux`` lines of a grub.cfg made by
    Debian 12's update-grub (``grub-linux.*``; None: no /boot/grub/grub.cfg, as on EL9;
    ``by_hand``: without grub-mkconfig's header, as in a grub.cfg someone wrote)."""
    found = "yes" if update_grub and grub else "no"
    output = [f"update-grub={found}", f"running={fixture(f'proc-cmdline.{running}').strip()}"]
    grub_cfg = fixture(f"grub-linux.{grub}").splitlines() if grub else []
    return output + [line for line in grub_cfg if not (by_hand and line.startswith("#"))]


def fresh_responses(distro: str) -> dict[Any, Response]:
    return {
        FirewallState().command(): lines("firewall-state.fresh"),
        SshdState().command(): lines("sshd-state.fresh"),
        PrimaryGroup().command("root"): "root",  # `id -gn -- root` on every distro
        KeyValues().command(hardening.LOGIN_DEFS): lines("login-defs.fresh"),
        PasswordAccounts().command(): lines("password-accounts.fresh"),
        WritableSysctls().command(sorted(hardening_schema.SYSCTL_KERNEL)): lines(
            "writable-sysctls.controller"
        ),
        AuditBoot().command(): audit_boot("plain", "stock" if distro in APT else None),
        re.compile(r"systemctl show --all --property Id --property SubState ('\*'|firewalld)"): (
            ["Id=firewalld.service", "SubState=running"] if distro in DNF else []
        ),
    }


def first(run: Run, pattern: str) -> int:
    for i, command in enumerate(run.commands):
        if re.search(pattern, command):
            return i
    raise AssertionError(f"no command matches {pattern!r}:\n" + "\n".join(run.commands))


@pytest.mark.parametrize("distro", ALL)
def test_fresh_host_gets_the_ruleset_checked_armed_applied_confirmed_then_kept(
    distro: str,
) -> None:
    cfg = config(distro)
    run = run_roles(cfg, distro, fresh_responses(distro))
    assert not run.failed
    assert run.files[firewall_rules.FIREWALL_CANDIDATE] == firewall_rules.render_ruleset(cfg, 22)
    install = first(run, r"(apt-get|dnf) .*install.* nftables")
    check = first(run, rf"^nft -c -f {firewall_rules.FIREWALL_CANDIDATE}$")
    arm = first(run, r"systemd-run .*--unit=gpunode-firewall-rollback --on-active=60s")
    load_ = first(run, rf"^nft -f {firewall_rules.FIREWALL_CANDIDATE}$")
    confirm = first(run, r"^true$")  # the command on the NEW connection
    keep = first(
        run, rf"install -m 600 {firewall_rules.FIREWALL_CANDIDATE} {firewall_rules.FIREWALL_ACTIVE}"
    )
    enable = first(run, r"systemctl enable gpunode-firewall\.service")
    assert install < check < arm < load_ < confirm < keep < enable
    # the rollback saves the running table before anything is loaded, and is checked
    assert "nft list table inet gpunode" in run.commands[arm]
    assert f"nft -c -f {firewall_rules.FIREWALL_ROLLBACK}" in run.commands[arm]
    assert "systemctl stop gpunode-firewall-rollback.timer" in run.commands[keep]
    assert not run.grep(r"flush ruleset")
    if distro in DNF:  # the firewall gpunode replaces goes only once its own is kept for boot
        assert enable < first(run, r"systemctl stop firewalld\.service")
    else:
        assert not run.grep(r"firewalld|ufw")


@pytest.mark.parametrize("distro", ["debian12", "rhel9"])
def test_failed_confirmation_fails_the_host_and_leaves_the_rollback_armed(
    distro: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the confirmation's own clock (gpunode/operations/firewall.py), so that its retries for
    # min(15 s, rollback_seconds / 2) pass at once: one attempt a second, then the failure
    clock = fake_clock(monkeypatch, confirm_ops)
    responses = {**fresh_responses(distro), re.compile(r"^true$"): {"success": False}}
    run = run_roles(config(distro), distro, responses)
    assert run.failed
    assert len(run.grep(r"^true$")) == 15 and clock[0] == 15.0
    assert run.grep(rf"^nft -f {firewall_rules.FIREWALL_CANDIDATE}$")  # it was loaded
    # never disarmed, never kept for boot: the timer restores the previous table
    assert not run.grep(r"systemctl stop gpunode-firewall-rollback\.timer && ")
    assert not run.grep(rf"install -m 600 {firewall_rules.FIREWALL_CANDIDATE}")
    # finding 10: the firewall it would replace (firewalld on EL9) still runs, and the boot
    # configuration is untouched: no unit written, none enabled
    assert not run.grep(r"systemctl (stop|disable) .*firewalld")
    assert f"/etc/systemd/system/{firewall_rules.FIREWALL_UNIT}" not in run.files
    assert not run.grep(r"systemctl (enable|daemon-reload)")
    # nothing after the failure
    assert not run.grep(r"try-reload|^sysctl -q -w")
    assert hardening.SSHD_STAGED not in run.files and hardening.SYSCTL_FILE not in run.files


def test_converged_firewall_changes_nothing() -> None:
    cfg = config()
    live = lines(
        "firewall-state.converged",
        active_sha1=firewall_rules.sha1(firewall_rules.render_ruleset(cfg, 22)),
    )
    run = run_roles(
        cfg, "debian12", {**fresh_responses("debian12"), FirewallState().command(): live}
    )
    assert not run.grep(r"^nft |systemd-run")
    assert firewall_rules.FIREWALL_CANDIDATE not in run.files


@pytest.mark.parametrize(
    "drift",
    [
        {"loaded": "no"},  # someone deleted the table
        {"live_sha1": "0" * 40},  # someone edited the live rules
        {"armed": "yes"},  # an earlier run died between arming and confirming
        {"active_sha1": "0" * 40},  # the ruleset file for boot differs
    ],
)
def test_firewall_drift_is_repaired(drift: dict[str, str]) -> None:
    cfg = config()
    sha = firewall_rules.sha1(firewall_rules.render_ruleset(cfg, 22))
    live = lines("firewall-state.converged", **{"active_sha1": sha, **drift})
    run = run_roles(
        cfg, "debian12", {**fresh_responses("debian12"), FirewallState().command(): live}
    )
    assert run.grep(rf"^nft -f {firewall_rules.FIREWALL_CANDIDATE}$")


@pytest.mark.parametrize("distro", ALL)
def test_sshd_dropin_is_validated_before_reload(distro: str) -> None:
    cfg = config(distro)
    run = run_roles(cfg, distro, fresh_responses(distro))
    assert run.files[hardening.SSHD_STAGED] == hardening.render_sshd(cfg, "root", "root")
    (script,) = run.grep(r"sshd -t -f ")
    steps = script.splitlines()
    service = "sshd" if distro in DNF else "ssh"
    assert steps[1] == f"/usr/sbin/sshd -t -f {hardening.SSHD_STAGED}"
    assert steps[-1] == f"systemctl try-reload-or-restart {service}"
    assert script.index("if ! /usr/sbin/sshd -t; then") < script.index("try-reload-or-restart")
    assert steps[0] == "set -e"


def test_sshd_is_left_alone_when_the_dropin_matches() -> None:
    cfg = config()
    sshd = lines(
        "sshd-state.converged",
        dropin_sha1=firewall_rules.sha1(hardening.render_sshd(cfg, "root", "root")),
    )
    run = run_roles(cfg, "debian12", {**fresh_responses("debian12"), SshdState().command(): sshd})
    assert not run.grep(r"sshd -t|try-reload")
    assert hardening.SSHD_STAGED not in run.files


def test_sshd_config_without_the_include_fails_the_host() -> None:
    sshd = lines("sshd-state.fresh", include="no")
    run = run_roles(
        config(), "debian12", {**fresh_responses("debian12"), SshdState().command(): sshd}
    )
    assert run.failed
    assert any(
        "no 'Include /etc/ssh/sshd_config.d/*.conf' line" in out.stderr
        for _, ok, out in run.results
        if not ok
    )
    assert hardening.SSHD_STAGED not in run.files


@pytest.mark.parametrize("distro", ALL)
def test_sysctl_file_and_live_values(distro: str, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(distro)
    with caplog.at_level(logging.DEBUG, logger="pyinfra"):
        run = run_roles(cfg, distro, fresh_responses(distro))
    text = run.files[hardening.SYSCTL_FILE]
    persisted = dict(line.split(" = ") for line in text.splitlines() if " = " in line)
    assert persisted == {k: str(v) for k, v in hardening.sysctl_settings(cfg).items()}
    assert persisted["net.ipv4.conf.all.accept_redirects"] == "0"
    assert persisted["kernel.randomize_va_space"] == "2"
    (network,) = run.grep(r"^sysctl -q -w net\.")
    assert "net.ipv4.tcp_syncookies=1" in network and "net.ipv4.ip_forward=0" in network
    # kernel keys: the writable ones applied; kernel.sysrq is read-only on that machine
    (kernel,) = run.grep(r"^sysctl -q -w (kernel|fs)\.")
    assert "kernel.kptr_restrict=2" in kernel and "kernel.sysrq" not in kernel
    # and says so in the run's output
    notices = [r.getMessage() for r in caplog.records if "read-only here" in r.getMessage()]
    assert notices
    assert all(
        n.endswith(
            "read-only here (a container?): kernel.sysrq persisted in "
            f"{hardening.SYSCTL_FILE}, not applied"
        )
        for n in notices
    )


def test_in_a_container_kernel_sysctls_are_persisted_not_applied() -> None:
    cfg = config()
    responses = {
        **fresh_responses("debian12"),
        WritableSysctls().command(sorted(hardening_schema.SYSCTL_KERNEL)): lines(
            "writable-sysctls.nspawn"
        ),
        Sysctl().command(sorted(hardening_schema.SYSCTL_NETWORK)).get_raw_value(): lines(
            "sysctl-network.converged"
        ),
    }
    run = run_roles(cfg, "debian12", responses, container="systemd-nspawn")
    assert "kernel.sysrq = 0" in run.files[hardening.SYSCTL_FILE]
    assert not run.grep(r"^sysctl -q -w")  # network keys already right, kernel keys read-only


def modprobe_lines(text: str) -> list[tuple[str, str, str]]:
    """(command, module, rest) of each modprobe.d line that is not a comment."""
    out = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            command, module, *rest = line.split()
            out.append((command, module, " ".join(rest)))
    return out


@pytest.mark.parametrize("distro", ALL)
def test_uncommon_kernel_modules_are_turned_off(distro: str) -> None:
    """Each module of DISABLED_MODULES: an explicit load runs /bin/false, no alias loads
    it; the file is root's."""
    run = run_roles(config(distro), distro, fresh_responses(distro))
    assert not run.failed
    expected = []
    for module in hardening_schema.DISABLED_MODULES:
        expected += [("install", module, "/bin/false"), ("blacklist", module, "")]
    assert modprobe_lines(run.files[hardening.MODPROBE_FILE]) == expected
    assert {"dccp", "sctp", "rds", "tipc", "usb-storage", "firewire-core"} <= set(
        hardening_schema.DISABLED_MODULES
    )
    upload = run.grep(rf"{re.escape(hardening.MODPROBE_FILE)}")
    assert any("chown root:root" in c or "chown root" in c for c in upload), upload


def test_a_site_allows_a_module_back_and_turns_another_off() -> None:
    cfg = load_one(
        {
            "distro": "debian12",
            "firewall": {"enabled": False},
            "hardening": {"allow_modules": ["sctp"], "disable_modules": ["bluetooth"]},
        }
    )
    lines = modprobe_lines(hardening.render_modprobe(cfg))
    modules = [m for _, m, _ in lines]
    assert "sctp" not in modules
    assert ("install", "bluetooth", "/bin/false") in lines and (
        "blacklist",
        "bluetooth",
        "",
    ) in lines
    assert modules.count("dccp") == 2


@pytest.mark.parametrize(
    ("hardening_data", "says"),
    [
        (
            {"allow_modules": ["nouveau"]},
            "defaults: hardening.allow_modules: 'nouveau' is not a module gpunode turns off "
            "(allowed: dccp, sctp, rds, tipc, cramfs, freevxfs, jffs2, hfs, hfsplus, udf, "
            "usb-storage, firewire-core)",
        ),
        (
            {"disable_modules": ["sctp"]},
            "defaults: hardening.disable_modules: 'sctp' is turned off already (allowed: another "
            "module)",
        ),
        ({"allow_modules": ["sctp", "sctp"]}, "a module is listed twice (allowed: each once)"),
        (
            {"disable_modules": ["evil /bin/sh"]},
            "hardening.disable_modules[0]: 'evil /bin/sh' is not allowed (allowed: a kernel module "
            "name such as sctp",
        ),
        (
            {"disable_modules": ["x\ninstall dccp /bin/true"]},
            "defaults: hardening.disable_modules: [0] 'x\\ninstall dccp /bin/true' holds the "
            "control character '\\n'",
        ),
    ],
)
def test_bad_module_lists_are_refused_at_load(hardening_data: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_one({"distro": "debian12", "hardening": hardening_data})
    assert says in str(err.value), str(err.value)
    assert "Traceback" not in str(err.value)


def test_in_a_container_the_module_file_is_written_with_a_notice(caplog) -> None:
    with caplog.at_level(logging.DEBUG, logger="pyinfra"):
        run = run_roles(config(), "debian12", fresh_responses("debian12"), container="lxc")
    assert hardening.MODPROBE_FILE in run.files
    notices = [r.getMessage() for r in caplog.records if "kernel is the one" in r.getMessage()]
    assert notices and all(
        n.endswith(
            "the kernel is the one of the machine underneath (lxc): "
            f"{hardening.MODPROBE_FILE} is written, modules are refused where this host boots "
            "its own kernel"
        )
        for n in notices
    )


@pytest.mark.parametrize("distro", ALL)
def test_the_login_banner_says_no_os_and_is_sshds(distro: str) -> None:
    run = run_roles(config(distro), distro, fresh_responses(distro))
    default = "Authorized uses only. All activity may be monitored and reported.\n"
    assert run.files[hardening.ISSUE_FILE] == default
    assert run.files[hardening.ISSUE_NET_FILE] == default
    assert hardening.sshd_options(config(distro), "root")["banner"] == "/etc/issue.net"
    assert "Banner /etc/issue.net" in hardening.render_sshd(config(distro), "root", "root")


def test_a_backslash_in_the_banner_is_doubled_for_the_console_only() -> None:
    """agetty reads /etc/issue's backslash escapes (``\\l``: the tty); sshd and
    /etc/issue.net print text as it is."""
    banner = ["Authorized uses only (\\l is not the tty here)."]
    cfg = load_one(
        {"distro": "debian12", "firewall": {"enabled": False}, "hardening": {"banner": banner}}
    )
    run = run_roles(cfg, "debian12", fresh_responses("debian12"))
    assert run.files[hardening.ISSUE_FILE] == "Authorized uses only (\\\\l is not the tty here).\n"
    assert (
        run.files[hardening.ISSUE_NET_FILE] == "Authorized uses only (\\l is not the tty here).\n"
    )
    assert hardening.render_issue(cfg) == run.files[hardening.ISSUE_FILE]  # the console's


def test_without_a_banner_the_distros_files_stay() -> None:
    cfg = load_one(
        {"distro": "debian12", "firewall": {"enabled": False}, "hardening": {"banner": None}}
    )
    run = run_roles(cfg, "debian12", fresh_responses("debian12"))
    assert hardening.ISSUE_FILE not in run.files and hardening.ISSUE_NET_FILE not in run.files
    assert hardening.sshd_options(cfg, "root")["banner"] == "none"


@pytest.mark.parametrize("distro", ALL)
def test_core_dumps_packages_and_file_modes(distro: str) -> None:
    # the files exist, with loose modes and the wrong group
    loose = {entry.path: "x" for entry in hardening_schema.STRICT_FILES["apt"]}
    run = run_roles(
        config(distro),
        distro,
        fresh_responses(distro),
        handlers=[converged(loose, dict.fromkeys(loose, "666"))],
    )
    assert "hard    core    0" in run.files[hardening.CORE_LIMITS_FILE]
    assert "Storage=none" in run.files[hardening.COREDUMP_DROPIN]
    shadow = "chmod 000 /etc/shadow" if distro in DNF else "chmod 640 /etc/shadow"
    assert run.grep(rf"^{shadow}$")
    assert run.grep(r"^chmod 600 /etc/ssh/sshd_config$")
    assert bool(run.grep(r"^chown root:shadow /etc/shadow$")) == (distro in APT)
    assert not run.grep(r"^chown .* /etc/passwd$")  # root:root already
    # a fresh host has none of the legacy services: nothing to remove
    assert not run.grep(r"(apt-get|dnf) .*(remove|purge)")


@pytest.mark.parametrize("distro", APT)
def test_installed_legacy_services_are_removed(distro: str) -> None:
    responses = {
        **fresh_responses(distro),
        # `dpkg -l` lines of two installed packages, as pyinfra's DebPackages reads them
        re.compile(r"\( dpkg -l \)"): [
            "ii  telnetd 0.17+2.4-2 amd64 telnet server",
            "ii  nis 4.3 amd64 clients and daemons for NIS",
        ],
    }
    run = run_roles(config(distro), distro, responses)
    (remove,) = run.grep(r"apt-get .*remove")
    assert "telnetd" in remove and "nis" in remove


def test_hardening_can_be_turned_off() -> None:
    cfg = load_one({"hardening": {"enabled": False}})
    run = run_roles(cfg, "debian12", fresh_responses("debian12"))
    assert not run.grep(r"sshd|sysctl|core")
    assert hardening.SYSCTL_FILE not in run.files


# --- after upgrades: needrestart and package verification -------------------------------

# needrestart.conf's own override_rc (Debian 12's needrestart 3.6) in part: the drop-in adds to
# it, read the way needrestart reads its conf.d (eval of the file after needrestart.conf).
NEEDRESTART_LOADER = r"""
our %nrconf = (restart => 'i', override_rc => {qr(^dbus) => 0});
my $fn = shift;
eval do { local(@ARGV, $/) = $fn; <> };
die "Error parsing $fn: $@" if $@;
print "restart=$nrconf{restart} kernelhints=$nrconf{kernelhints} ucodehints=$nrconf{ucodehints}\n";
for my $unit (@ARGV) {
    my @hit = grep { $unit =~ /$_/ } keys %{$nrconf{override_rc}};
    my $restart = @hit ? $nrconf{override_rc}->{$hit[0]} : 1;
    print "$unit $restart\n";
}
"""


def needrestart_reads(conf: str, units: list[str], tmp_path: Path) -> list[str]:
    """What Perl (needrestart's language) makes of the drop-in: its settings, then per unit
    1 (restarted automatically) or 0 (listed only)."""
    path = tmp_path / "60-gpunode.conf"
    path.write_text(conf)
    proc = subprocess.run(
        ["perl", "-e", NEEDRESTART_LOADER, str(path), *units],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_needrestart_restarts_daemons_but_lists_inference_and_the_gateway(tmp_path: Path) -> None:
    units = [
        "gpunode-inference-chat.service",
        "gpunode-inference-big-2.service",
        "haproxy.service",
        "ssh.service",
        "chrony.service",
        "gpunode-inference-.service",  # no service name: not one of gpunode's units
        "my-haproxy.service",
        "haproxy.service.bak",
        "dbus.service",  # needrestart's own default stays
    ]
    assert needrestart_reads(hardening.render_needrestart(), units, tmp_path) == [
        "restart=a kernelhints=-1 ucodehints=0",
        "gpunode-inference-chat.service 0",
        "gpunode-inference-big-2.service 0",
        "haproxy.service 0",
        "ssh.service 1",
        "chrony.service 1",
        "gpunode-inference-.service 1",
        "my-haproxy.service 1",
        "haproxy.service.bak 1",
        "dbus.service 0",
    ]


def test_a_broken_needrestart_dropin_is_seen_by_perl(tmp_path: Path) -> None:
    path = tmp_path / "bad.conf"
    path.write_text(hardening.render_needrestart().replace("= 'a';", "= 'a'"))
    proc = subprocess.run(
        ["perl", "-e", NEEDRESTART_LOADER, str(path)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode != 0 and "Error parsing" in proc.stderr


def _perl_regex_safe(regex: str) -> bool:
    # the drop-in writes qr(REGEX): a parenthesis would end it early
    return "(" not in regex and ")" not in regex and "\n" not in regex


def test_list_only_regexes_fit_the_qr_delimiters() -> None:
    assert hardening_schema.NEEDRESTART_LIST_ONLY
    assert all(_perl_regex_safe(r) for r in hardening_schema.NEEDRESTART_LIST_ONLY)
    assert not _perl_regex_safe("^(a|b)$")


def verify_units(distro: str, tmp_path: Path, calendar: str = "weekly") -> tuple[Path, Path]:
    cfg = load_one({"distro": distro, "hardening": {"verify_packages": calendar}})
    family = "apt" if distro in APT else "dnf"
    out = []
    for name, text in hardening.render_verify_units(cfg, family).items():
        path = tmp_path / name
        path.write_text(text)
        out.append(path)
    return out[0], out[1]


@pytest.mark.parametrize("distro", ["debian12", "rocky9"])
def test_package_verification_units_pass_systemd_analyze(distro: str, tmp_path: Path) -> None:
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze (package systemd) is needed for these checks")
    service, timer = verify_units(distro, tmp_path)
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(timer), str(service)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    # an unknown key only warns (exit 0): any output is a failure, but the one line that says
    # the tool itself is not on this machine (debsums, rpm: installed on the node by the role)
    tool = "debsums" if distro in APT else "rpm"
    absent = f"Command /usr/bin/{tool} is not executable: No such file or directory"
    noise = [
        line
        for line in proc.stderr.splitlines()
        if line.strip() and not (line.endswith(absent) and not shutil.which(tool))
    ]
    assert proc.returncode in (0, 1) and noise == [], proc.stderr
    exposure = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(service)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", exposure.stdout)
    assert score, exposure.stdout + exposure.stderr
    assert float(score[1]) <= 1.3, exposure.stdout  # measured: 1.3 (systemd 252, Debian 12)


@pytest.mark.parametrize(
    ("distro", "command"),
    [
        ("debian12", "ExecStart=/usr/bin/debsums --silent"),
        ("ubuntu2404", "ExecStart=/usr/bin/debsums --silent"),
        ("rhel9", "ExecStart=/usr/bin/rpm --verify --all --noconfig --nomtime"),
    ],
)
def test_package_verification_command_and_schedule(
    distro: str, command: str, tmp_path: Path
) -> None:
    service, timer = verify_units(distro, tmp_path, "daily")
    assert re.findall(r"^ExecStart=.*$", service.read_text(), re.M) == [command]
    text = timer.read_text()
    assert re.findall(r"^OnCalendar=.*$", text, re.M) == ["OnCalendar=daily"]
    assert "Persistent=true" in text and "WantedBy=timers.target" in text


def _installs(run: Run) -> list[str]:
    return run.grep(r"(apt-get|dnf) .*install")


@pytest.mark.parametrize("distro", ALL)
def test_needrestart_and_package_verification_on_a_fresh_host(distro: str, caplog) -> None:
    responses = fresh_responses(distro)
    if distro in DNF:  # EPEL set up (where needrestart comes from on EL9)
        responses[re.compile(r"\( rpm --queryformat .* -qa \)")] = ["epel-release 9-8.el9"]
    run = run_roles(config(distro), distro, responses)
    assert not run.failed
    tool = "debsums" if distro in APT else "rpm"
    assert any(re.search(r"install.* needrestart\b", c) for c in _installs(run)), _installs(run)
    assert any(re.search(rf"install.* {tool}\b", c) for c in _installs(run)), _installs(run)
    assert run.files[hardening.NEEDRESTART_FILE] == hardening.render_needrestart()
    units = hardening.render_verify_units(config(distro), "apt" if distro in APT else "dnf")
    for unit, text in units.items():
        assert run.files[f"/etc/systemd/system/{unit}"] == text
    enable = first(run, rf"systemctl enable {re.escape(hardening.VERIFY_TIMER)}")
    assert first(run, r"systemctl daemon-reload") < enable
    assert run.grep(rf"systemctl start {re.escape(hardening.VERIFY_TIMER)}")
    for path in (hardening.NEEDRESTART_FILE, f"/etc/systemd/system/{hardening.VERIFY_SERVICE}"):
        upload = run.grep(re.escape(path))
        assert any("chown root:root" in c for c in upload), upload
        assert any("chmod 644" in c for c in upload), upload


def test_without_epel_needrestart_is_a_notice_on_el(caplog) -> None:
    with caplog.at_level(logging.DEBUG, logger="pyinfra"):
        run = run_roles(config("rocky9"), "rocky9", fresh_responses("rocky9"))
    assert not run.failed
    assert hardening.NEEDRESTART_FILE not in run.files
    assert not any("needrestart" in c for c in _installs(run))
    notices = [r.getMessage() for r in caplog.records if "comes from EPEL" in r.getMessage()]
    assert notices and notices[0].endswith(
        "needrestart comes from EPEL (and CRB) on EL9, and EPEL is not set up here: daemons are "
        "not restarted after upgrades (set up EPEL, or set hardening.restart_services: false)"
    )
    assert any(re.search(r"install.* rpm\b", c) for c in _installs(run))


def test_turned_off_they_are_taken_away() -> None:
    cfg = load_one(
        {
            "distro": "debian12",
            "firewall": {"enabled": False},
            "hardening": {"restart_services": False, "verify_packages": None},
        }
    )
    on_host = {
        hardening.NEEDRESTART_FILE: hardening.render_needrestart(),
        **{
            f"/etc/systemd/system/{u}": t
            for u, t in hardening.render_verify_units(config(), "apt").items()
        },
    }
    run = run_roles(
        cfg,
        "debian12",
        fresh_responses("debian12"),
        handlers=[converged(on_host, dict.fromkeys(on_host, "644"))],
    )
    assert not run.failed
    for path in on_host:
        assert run.grep(rf"^rm -f {re.escape(path)}$"), path
    assert not any(re.search(r"needrestart|debsums", c) for c in _installs(run))
    assert not run.grep(rf"systemctl (start|enable) {re.escape(hardening.VERIFY_TIMER)}")


def test_bad_verify_schedule_is_refused_at_load() -> None:
    said = config_error({"hardening": {"verify_packages": "hourly"}})
    assert "hardening.verify_packages" in said and "'daily', 'weekly' or 'monthly'" in said, said


# --- the docs' tables of controls ------------------------------------------------------------


def _keys(model: type[BaseModel], prefix: str) -> Iterable[str]:
    """Every key under ``prefix``; a section that may be null (``X | None``) is a key of its
    own (null turns it off) and has its keys too."""
    for name, field in model.model_fields.items():
        kind = field.annotation
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(options) == 1:
            if isinstance(options[0], type) and issubclass(options[0], BaseModel):
                yield f"{prefix}.{name}"
                kind = options[0]
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            yield from _keys(kind, f"{prefix}.{name}")
        else:
            yield f"{prefix}.{name}"


def test_the_docs_tables_name_every_control_the_schema_has() -> None:
    """docs/hardening.md (issue 17: "the docs' control table matches the schema"): every
    key, every sshd option gpunode sets, every module turned off, each verification command."""
    text = (REPO_ROOT / "docs" / "hardening.md").read_text()
    keys = list(_keys(Hardening, "hardening"))
    assert "hardening.ssh.max_startups" in keys and "hardening.verify_packages" in keys
    assert "hardening.remote_logs" in keys and "hardening.remote_logs.ca_file" in keys
    assert [k for k in keys if not re.search(rf"`{re.escape(k)}[`:]", text)] == []
    options = [k for k in hardening.SSHD_KEYWORDS.values() if k not in ("Ciphers", "MACs")]
    assert [o for o in options if not re.search(rf"\b{o}\b", text)] == []
    modules = list(hardening_schema.DISABLED_MODULES)
    assert [m for m in modules if not re.search(rf"\b{re.escape(m)}\b", text)] == []
    commands = [c for _, c in hardening_schema.PACKAGE_VERIFY.values()]
    assert [c for c in commands if c.rsplit("/", 1)[-1] not in text] == []
    # each control of the sshd and OS tables names its source (a CIS item, a dev-sec control)
    for title in ("## sshd (", "## Kernel, network and OS ("):
        section = text.split(title, 1)[1].split("\n## ", 1)[0]
        rows = [line for line in section.splitlines() if line.startswith("| ")]
        assert rows[0] == "| control | default | key | source |", rows[0]
        unsourced = [
            row.split("|")[1].strip()
            for row in rows[1:]
            if not re.search(r"\b(CIS|dev-sec|Lynis)\b", row.rsplit("|", 2)[-2])
        ]
        assert unsourced == (["where", "all of it"] if "Kernel" in title else []), unsourced


# --- the firewall role, every path (what `make mutate` found unchecked in roles/firewall.py) ---


def firewall_ops(
    cfg: NodeConfig,
    distro: str,
    responses: dict[Any, Response],
    handlers: Iterable[Handler] = (),
    host_data: dict[str, Any] | None = None,
) -> tuple[list[str], Run]:
    """The firewall role alone: the names of the operations it planned, in order, as pyinfra
    prints them (and `gpunode drift` reports them), and the run."""
    states: list[Any] = []
    responses = {HostInfo().command(): list(host_info_output(distro, "")), **responses}
    run = run_deploys(
        cfg,
        responses,
        [firewall],
        handlers,
        SharedLogConnector,
        HOST,
        state_out=states,
        host_data=host_data,
    )
    state = states[0]
    names = [name for h in state.get_op_order() for name in state.op_meta[h].names]
    return [n.removeprefix("gpunode firewall | ") for n in names], run


APPLY_OPS = [
    "nftables",
    "Firewall directory",
    "Firewall ruleset candidate",
    "Check the candidate ruleset (nft -c)",
    "Arm the firewall rollback timer",
    "Load the candidate ruleset",
    "Confirm a new SSH connection gets in",
    "Disarm the rollback and keep the ruleset for boot",
    "Firewall boot unit",
    "Reload systemd units",
    "Firewall loaded at boot",
]


@pytest.mark.parametrize("distro", ALL)
def test_a_first_apply_names_each_step_and_uses_the_familys_package_manager(distro: str) -> None:
    names, run = firewall_ops(config(distro), distro, fresh_responses(distro))
    assert not run.failed
    stops = ["Stop a firewall that conflicts with gpunode's"] if distro in DNF else []
    assert names == APPLY_OPS + stops
    (install,) = run.grep(r"install.* nftables")
    if distro in APT:
        assert install.startswith("DEBIAN_FRONTEND=noninteractive apt-get") or "apt-get" in install
        assert "--no-install-recommends" in install and "dnf" not in install
    else:
        assert re.match(r"^dnf install -y nftables$", install), install
    # the directory root-only, the candidate and the boot unit with their modes
    assert run.grep(rf"^mkdir -p {firewall_rules.FIREWALL_DIR}$")
    assert run.grep(rf"^chmod 700 {firewall_rules.FIREWALL_DIR}$")
    assert run.grep(rf"^chmod 600 {firewall_rules.FIREWALL_CANDIDATE}$")
    assert run.grep(rf"^chmod 644 /etc/systemd/system/{firewall_rules.FIREWALL_UNIT}$")
    for path in (
        firewall_rules.FIREWALL_DIR,
        firewall_rules.FIREWALL_CANDIDATE,
        f"/etc/systemd/system/{firewall_rules.FIREWALL_UNIT}",
    ):
        assert run.grep(rf"^chown root:root {re.escape(path)}$"), path
    # the unit written is the template's, and systemd reloads before it is enabled
    assert (
        run.files[f"/etc/systemd/system/{firewall_rules.FIREWALL_UNIT}"]
        == (REPO_ROOT / "templates" / "firewall" / firewall_rules.FIREWALL_UNIT).read_text()
    )
    assert first(run, r"systemctl daemon-reload") < first(
        run, rf"systemctl enable {firewall_rules.FIREWALL_UNIT}"
    )
    assert not run.grep(rf"systemctl (start|restart) {firewall_rules.FIREWALL_UNIT}")


def test_the_ssh_rule_opens_the_port_gpunode_connects_to() -> None:
    cfg = config()
    _, run = firewall_ops(
        cfg, "debian12", fresh_responses("debian12"), host_data={"ssh_port": 2222}
    )
    ruleset = run.files[firewall_rules.FIREWALL_CANDIDATE]
    assert ruleset == firewall_rules.render_ruleset(cfg, 2222)
    assert ruleset != firewall_rules.render_ruleset(cfg, 22)


def test_a_converged_firewall_only_clears_a_leftover_candidate() -> None:
    cfg = config()
    sha = firewall_rules.sha1(firewall_rules.render_ruleset(cfg, 22))
    live = lines("firewall-state.converged", active_sha1=sha)
    unit = f"/etc/systemd/system/{firewall_rules.FIREWALL_UNIT}"
    leftover = converged(
        {
            firewall_rules.FIREWALL_CANDIDATE: "old",
            unit: (REPO_ROOT / "templates" / "firewall" / firewall_rules.FIREWALL_UNIT).read_text(),
        },
        {firewall_rules.FIREWALL_CANDIDATE: "600", unit: "644"},
    )
    responses = {**fresh_responses("debian12"), FirewallState().command(): live}
    names, run = firewall_ops(cfg, "debian12", responses, handlers=[leftover])
    assert names == [
        "nftables",
        "Firewall directory",
        "No leftover candidate ruleset",
        "Firewall boot unit",
        "Reload systemd units",
        "Firewall loaded at boot",
    ]
    assert run.grep(rf"^rm -f {firewall_rules.FIREWALL_CANDIDATE}$")
    assert not run.grep(r"^nft |systemd-run|daemon-reload")


@pytest.mark.parametrize(
    ("distro", "running", "stopped"),
    [
        ("debian12", ["ufw.service"], ["ufw.service"]),
        ("ubuntu2404", ["ufw.service", "firewalld.service"], ["ufw.service", "firewalld.service"]),
        ("rocky9", ["firewalld.service"], ["firewalld.service"]),
        ("rhel9", ["ufw.service"], []),  # not one of EL9's: left alone
        ("debian12", [], []),
    ],
)
def test_only_the_familys_conflicting_firewalls_are_stopped_and_disabled(
    distro: str, running: list[str], stopped: list[str]
) -> None:
    def systemd(command: str) -> Response | None:
        """systemctl show for all units ('*') or one: the running ones, enabled."""
        m = re.search(r"--property (SubState|UnitFileState) ('\*'|\S+) \)", command)
        if not m:
            return None
        asked = running if m[2] == "'*'" else [u for u in running if u == m[2]]
        value = "running" if m[1] == "SubState" else "enabled"
        return [line for u in asked for line in (f"Id={u}", f"{m[1]}={value}")]

    responses = dict(fresh_responses(distro))
    del responses[
        re.compile(r"systemctl show --all --property Id --property SubState ('\*'|firewalld)")
    ]
    names, run = firewall_ops(config(distro), distro, responses, handlers=[systemd])
    assert names == APPLY_OPS + ["Stop a firewall that conflicts with gpunode's"] * len(stopped)
    for unit in stopped:
        assert first(run, rf"systemctl enable {firewall_rules.FIREWALL_UNIT}") < first(
            run, rf"^systemctl stop {unit}$"
        )
        assert run.grep(rf"^systemctl disable {unit}$")
    assert len(run.grep(r"^systemctl (stop|disable) (ufw|firewalld)")) == 2 * len(stopped)


def test_a_disabled_firewall_takes_gpunodes_table_and_boot_unit_away(caplog) -> None:
    cfg = load_one({"distro": "debian12", "firewall": {"enabled": False}})
    responses = {
        **fresh_responses("debian12"),
        FirewallState().command(): lines("firewall-state.converged"),  # table loaded
        re.compile(r"--property UnitFileState gpunode-firewall\.service"): [
            "Id=gpunode-firewall.service",
            "UnitFileState=enabled",
        ],
    }
    on_host = converged({firewall_rules.FIREWALL_ACTIVE: "table"}, {})
    with caplog.at_level(logging.DEBUG, logger="pyinfra"):
        names, run = firewall_ops(cfg, "debian12", responses, handlers=[on_host])
    assert not run.failed
    assert names == [
        "Remove gpunode's nftables table (firewall disabled)",
        "Firewall not loaded at boot (disabled)",
        "No firewall ruleset (disabled)",
        "Firewall",
    ]
    assert run.grep(r"^nft delete table inet gpunode$")
    assert run.grep(rf"^systemctl disable {firewall_rules.FIREWALL_UNIT}$")
    assert not run.grep(rf"systemctl (stop|start) {firewall_rules.FIREWALL_UNIT}")
    assert run.grep(rf"^rm -f {firewall_rules.FIREWALL_ACTIVE}$")
    assert not run.grep(r"install.* nftables|systemd-run")
    said = [r.getMessage() for r in caplog.records if "enabled is false" in r.getMessage()]
    assert said and said[0].endswith("firewall.enabled is false: gpunode's table is not loaded")


def test_a_disabled_firewall_without_a_table_deletes_nothing() -> None:
    cfg = load_one({"distro": "debian12", "firewall": {"enabled": False}})
    names, run = firewall_ops(cfg, "debian12", fresh_responses("debian12"))
    assert names == [
        "Firewall not loaded at boot (disabled)",
        "No firewall ruleset (disabled)",
        "Firewall",
    ]
    assert not run.grep(r"^nft ")


# --- file integrity (AIDE) -------------------------------------------------------------------


def aide_lines(text: str) -> list[str]:
    return [line for line in content_lines(text) if not line.startswith("#")]


@pytest.mark.parametrize(
    ("distro", "key"),
    [("debian12", "database_in"), ("ubuntu2204", "database_in"), ("rocky9", "database")],
)
def test_aide_settings_watch_binaries_and_configuration(distro: str, key: str) -> None:
    family = "apt" if distro in APT else "dnf"
    lines = aide_lines(hardening.render_aide(config(distro), distro, family))
    assert lines[:4] == [
        f"{key}=file:/var/lib/gpunode/aide/aide.db.gz",
        "database_out=file:/var/lib/gpunode/aide/aide.db.new.gz",
        "gzip_dbout=yes",
        "report_url=stdout",
    ]
    assert "CONTENT = p+u+g+l+sha256" in lines and "PERMS = p+u+g+l" in lines
    for path in ("/usr/bin", "/usr/sbin", "/usr/local", "/etc", r"/root/\.ssh"):
        assert f"{path} CONTENT" in lines, path
    # the secrets: owner and mode only, never a digest of their content
    assert "/etc/gpunode/secrets PERMS" in lines
    assert r"!/etc/ld\.so\.cache$" in lines


def test_a_secret_file_elsewhere_is_watched_for_its_mode_only() -> None:
    cfg = load_one(
        {
            "distro": "debian12",
            "vault": {"addr": "https://vault.example.net:8200"},
            "secrets": {
                "hf-token": {"path": "kv/data/hf", "key": "token", "dest": "/etc/my+app/hf.env"},
            },
        }
    )
    lines = aide_lines(hardening.render_aide(cfg, "debian12", "apt"))
    assert r"/etc/my\+app/hf\.env$ PERMS" in lines, lines


def test_each_secret_file_is_watched_for_its_mode_by_its_own_path() -> None:
    cfg = load_one(
        {
            "distro": "debian12",
            "vault": {"addr": "https://vault.example.net:8200"},
            "secrets": {
                "hf-token": {"path": "kv/data/hf", "key": "token"},  # the default dest
                "db": {"path": "kv/data/db", "key": "pw", "dest": "/etc/app/db.env"},
            },
        }
    )
    watched = dict(hardening.aide_watch(cfg))
    extra = {p: r for p, r in watched.items() if p not in hardening_schema.AIDE_WATCH}
    assert extra == {"/etc/gpunode/secrets/hf-token.env": "PERMS", "/etc/app/db.env": "PERMS"}


def test_a_first_database_goes_in_place_only_when_aide_made_it(tmp_path: Path) -> None:
    """The init command under a real sh, its paths in a temporary directory: AIDE failing
    leaves no database in place (set -e stops before the move); AIDE succeeding puts it there,
    root's alone."""
    root, bin_dir = tmp_path / "aide", tmp_path / "bin"
    bin_dir.mkdir()
    command = (
        hardening.aide_init_command("apt")
        .replace(hardening.AIDE_DIR, str(root))
        .replace("/usr/bin/aide", str(bin_dir / "aide"))
        .replace(" -o root -g root", "")
    )
    aide = bin_dir / "aide"
    aide.write_text(f"#!/bin/sh\necho half > {root}/aide.db.new.gz\nexit 17\n")
    aide.chmod(0o755)
    failed = subprocess.run(["sh", "-c", command], capture_output=True, text=True)
    assert failed.returncode != 0 and not (root / "aide.db.gz").exists()
    aide.write_text(f"#!/bin/sh\necho whole > {root}/aide.db.new.gz\n")
    done = subprocess.run(["sh", "-c", command], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    db = root / "aide.db.gz"
    assert db.read_text() == "whole\n" and db.stat().st_mode & 0o777 == 0o600
    assert root.stat().st_mode & 0o777 == 0o700 and not (root / "aide.db.new.gz").exists()


@pytest.mark.parametrize("path", ["/etc/x y", "relative", "/etc/a\nb", "/etc/../shadow"])
def test_aide_paths_that_are_not_plain_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match="is not a plain absolute path"):
        hardening.aide_path(path)


def test_aide_paths_are_escaped_for_its_regular_expressions() -> None:
    assert hardening.aide_path("/etc/a.b+c@d:e,f=g/h_i-j") == r"/etc/a\.b\+c\@d\:e\,f\=g/h_i-j"


def aide_units(distro: str, tmp_path: Path) -> tuple[Path, Path]:
    family = "apt" if distro in APT else "dnf"
    out = []
    for name, text in hardening.render_integrity_units(config(distro), family).items():
        path = tmp_path / name
        path.write_text(text)
        out.append(path)
    return out[0], out[1]


@pytest.mark.parametrize("distro", ["debian12", "rocky9"])
def test_file_integrity_units(distro: str, tmp_path: Path) -> None:
    service, timer = aide_units(distro, tmp_path)
    aide = "/usr/bin/aide" if distro in APT else "/usr/sbin/aide"
    assert re.findall(r"^ExecStart=.*$", service.read_text(), re.M) == [
        f"ExecStart={aide} --config=/etc/gpunode/aide.conf --check"
    ]
    assert re.findall(r"^OnCalendar=.*$", timer.read_text(), re.M) == ["OnCalendar=daily"]
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(timer), str(service)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    absent = f"Command {aide} is not executable: No such file or directory"
    noise = [
        line
        for line in proc.stderr.splitlines()
        if line.strip() and not (line.endswith(absent) and not Path(aide).exists())
    ]
    assert noise == [], proc.stderr
    exposure = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(service)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", exposure.stdout)
    assert score and float(score[1]) <= 1.3, exposure.stdout  # measured: 1.3


@pytest.mark.parametrize("distro", ALL)
def test_a_fresh_host_gets_aide_its_settings_and_a_first_database(distro: str) -> None:
    run = run_roles(config(distro), distro, fresh_responses(distro))
    assert not run.failed
    assert any(re.search(r"install.* aide\b", c) for c in _installs(run))
    family = "apt" if distro in APT else "dnf"
    assert run.files[hardening.AIDE_CONF] == hardening.render_aide(config(distro), distro, family)
    assert run.grep(rf"^chmod 600 {re.escape(hardening.AIDE_CONF)}$")
    assert run.grep(rf"^chmod 700 {re.escape(hardening.AIDE_DIR)}$")
    (init,) = run.grep(r"--init")
    assert init == hardening.aide_init_command(family)
    assert run.commands.index(f"chmod 600 {hardening.AIDE_CONF}") < run.commands.index(init)
    assert run.grep(rf"systemctl enable {re.escape(hardening.INTEGRITY_TIMER)}")


def test_a_host_with_a_database_and_the_same_settings_is_not_scanned_again() -> None:
    cfg = config()
    on_host = converged(
        {
            hardening.AIDE_CONF: hardening.render_aide(cfg, "debian12", "apt"),
            hardening.AIDE_DB: "db",
        },
        {hardening.AIDE_CONF: "600", hardening.AIDE_DB: "600"},
    )
    run = run_roles(cfg, "debian12", fresh_responses("debian12"), handlers=[on_host])
    assert hardening.AIDE_CONF not in run.files
    assert not run.grep(r"--init")


def test_changed_settings_make_a_new_database() -> None:
    cfg = config()
    on_host = converged(
        {hardening.AIDE_CONF: "old settings", hardening.AIDE_DB: "db"},
        {hardening.AIDE_CONF: "600", hardening.AIDE_DB: "600"},
    )
    run = run_roles(cfg, "debian12", fresh_responses("debian12"), handlers=[on_host])
    assert hardening.AIDE_CONF in run.files
    assert run.grep(r"--init")


def _changes_a_file() -> Any:
    from pyinfra.api import deploy
    from pyinfra.operations import files

    @deploy("a role")
    def role() -> None:
        files.put(name="A file", src=io.StringIO("new"), dest="/etc/example.conf")

    return role


def test_a_deploy_takes_its_own_changes_into_the_database_and_only_then() -> None:
    cfg = config()
    changed = run_roles(
        cfg,
        "debian12",
        fresh_responses("debian12"),
        deploys=(_changes_a_file(), file_integrity),
    )
    assert changed.grep(r"--update") == [hardening.aide_update_command("apt")]
    nothing = run_roles(
        cfg,
        "debian12",
        fresh_responses("debian12"),
        handlers=[converged({"/etc/example.conf": "new"}, {"/etc/example.conf": "644"})],
        deploys=(_changes_a_file(), file_integrity),
    )
    assert not nothing.grep(r"--update")
    off = load_one({"distro": "debian12", "hardening": {"file_integrity": None}})
    run = run_roles(
        off, "debian12", fresh_responses("debian12"), deploys=(_changes_a_file(), file_integrity)
    )
    assert not run.grep(r"--update")


def test_the_update_puts_each_difference_in_the_journal_and_keeps_the_old_database_on_error(
    tmp_path: Path,
) -> None:
    """The update command under a real sh, its paths in a temporary directory: a fake aide that
    reports one changed file (AIDE 0.18's line) and exits 4; then one that fails (exit 17)."""
    command = hardening.aide_update_command("apt")
    root = tmp_path / "aide"
    root.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    journal = tmp_path / "journal"
    (bin_dir / "logger").write_text(f'#!/bin/sh\necho "$*" >> {journal}\ncat >> {journal}\n')
    (bin_dir / "logger").chmod(0o755)
    command = command.replace(hardening.AIDE_DIR, str(root))
    command = command.replace("/usr/bin/aide", str(bin_dir / "aide"))
    (root / "aide.db.gz").write_text("old")

    def fake_aide(status: int, creates: bool) -> None:
        new = f"echo new > {root}/aide.db.new.gz\n" if creates else ""
        (bin_dir / "aide").write_text(
            f"#!/bin/sh\n{new}echo 'Summary:'\necho 'f > ...    .H     : /etc/issue'\n"
            f"exit {status}\n"
        )
        (bin_dir / "aide").chmod(0o755)

    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    fake_aide(4, creates=True)
    done = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (root / "aide.db.gz").read_text() == "new\n"
    assert journal.read_text() == (
        "-t gpunode-file-integrity -p authpriv.notice\n"
        "taken in by a gpunode deploy: f > ...    .H     : /etc/issue\n"
    )
    assert list(root.iterdir()) == [root / "aide.db.gz"]  # no report left behind
    logged = journal.read_text()
    fake_aide(17, creates=False)
    failed = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True)
    assert failed.returncode == 1
    assert "AIDE could not update its database (exit status 17)" in failed.stderr
    assert (root / "aide.db.gz").read_text() == "new\n"  # the old one stays
    assert journal.read_text() == logged  # nothing said to be taken in
    assert list(root.iterdir()) == [root / "aide.db.gz"]  # its report removed too
    # nothing differs (AIDE's exit status 0): the database is renewed quietly
    fake_aide(0, creates=True)
    quiet = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True)
    assert (quiet.returncode, quiet.stderr) == (0, "")
    # a host AIDE was never set up on (no database): nothing to update, not a failure
    (root / "aide.db.gz").unlink()
    fake_aide(4, creates=True)
    untouched = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True)
    assert untouched.returncode == 0 and not (root / "aide.db.gz").exists()


def _integrity_update(distro: str) -> dict[str, str]:
    return hardening.render_integrity_update("apt" if distro in APT else "dnf")


@pytest.mark.parametrize("distro", ALL)
def test_with_automatic_upgrades_aide_takes_their_changes_in_once_they_ran(distro: str) -> None:
    """A security update the host installs by itself is not reported as tampering the next day:
    the automatic upgrades' unit wants gpunode-file-integrity-update.service, ordered after it."""
    family = "apt" if distro in APT else "dnf"
    upgrades = hardening_schema.AUTO_UPGRADE_SERVICE[family]
    assert upgrades == ("apt-daily-upgrade.service" if family == "apt" else "dnf-automatic.service")
    run = run_roles(config(distro), distro, fresh_responses(distro))
    assert not run.failed
    wanted = _integrity_update(distro)
    for path, text in wanted.items():
        assert run.files[path] == text, path
        mode = "700" if path == hardening.INTEGRITY_UPDATE_SCRIPT else "644"
        assert run.grep(rf"^chmod {mode} {re.escape(path)}$"), path
        assert run.grep(rf"^chown root:root {re.escape(path)}$"), path
    dropin = wanted[hardening.integrity_update_dropin(family)]
    assert hardening.integrity_update_dropin(family).startswith(
        f"/etc/systemd/system/{upgrades}.d/"
    )
    assert re.findall(r"^\w+=.*$", dropin, re.M) == [f"Wants={hardening.INTEGRITY_UPDATE_SERVICE}"]
    unit = wanted[f"/etc/systemd/system/{hardening.INTEGRITY_UPDATE_SERVICE}"]
    assert re.findall(r"^(?:After|ExecStart|ReadWritePaths)=.*$", unit, re.M) == [
        f"After={upgrades}",
        f"ExecStart={hardening.INTEGRITY_UPDATE_SCRIPT}",
        f"ReadWritePaths={hardening.AIDE_DIR}",
    ]
    script = wanted[hardening.INTEGRITY_UPDATE_SCRIPT]
    assert script.startswith("#!/bin/sh\n")
    assert hardening.aide_update_command(family, f"the automatic upgrades ({upgrades})") in script
    assert f"packages={hardening_schema.PACKAGE_DATABASE[family]}\n" in script
    last_write = max(
        run.commands.index(f"chmod 644 {p}") for p in wanted if p.endswith((".conf", ".service"))
    )
    reloads = [i for i, c in enumerate(run.commands) if c == "systemctl daemon-reload"]
    assert any(i > last_write for i in reloads)  # systemd reads the drop-in before the next run


@pytest.mark.parametrize(
    "data",
    [{"base": {"auto_updates": {"enabled": False}}}, {"hardening": {"file_integrity": None}}],
)
def test_without_automatic_upgrades_or_aide_the_update_unit_is_removed(
    data: dict[str, Any],
) -> None:
    cfg = load_one({"distro": "debian12", **data})
    on_host = _integrity_update("debian12")
    run = run_roles(
        cfg,
        "debian12",
        fresh_responses("debian12"),
        handlers=[converged(on_host, dict.fromkeys(on_host, "644"))],
    )
    assert not run.failed
    for path in on_host:
        assert run.grep(rf"^rm -f {re.escape(path)}$"), path
        assert path not in run.files
    assert "systemctl daemon-reload" in run.commands


def test_the_update_unit_is_valid_and_as_confined_as_the_check(tmp_path: Path) -> None:
    units = {
        Path(p).name: t for p, t in _integrity_update("debian12").items() if p.endswith(".service")
    }
    ((name, text),) = units.items()
    (tmp_path / name).write_text(text)
    (tmp_path / "apt-daily-upgrade.service").write_text(
        "[Service]\nType=oneshot\nExecStart=/bin/true\n"
    )
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / name)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    script = hardening.INTEGRITY_UPDATE_SCRIPT
    absent = f"Command {script} is not executable: No such file or directory"
    noise = [
        line for line in proc.stderr.splitlines() if line.strip() and not line.endswith(absent)
    ]
    assert noise == [], proc.stderr
    exposure = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(tmp_path / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", exposure.stdout)
    assert score and float(score[1]) <= 1.3, exposure.stdout  # the check's figure


def test_the_update_after_upgrades_runs_only_when_a_package_changed(tmp_path: Path) -> None:
    """The script under a real sh, its paths in a temporary directory: a package database older
    than AIDE's runs nothing; a newer one (an upgrade installed since) takes the changes in,
    each in the journal under the upgrades' name."""
    root, bin_dir = tmp_path / "aide", tmp_path / "bin"
    root.mkdir()
    bin_dir.mkdir()
    journal, ran, packages = tmp_path / "journal", tmp_path / "aide-ran", tmp_path / "status"
    (bin_dir / "logger").write_text(f'#!/bin/sh\necho "$*" >> {journal}\ncat >> {journal}\n')
    (bin_dir / "aide").write_text(
        f"#!/bin/sh\ntouch {ran}\necho new > {root}/aide.db.new.gz\n"
        "echo 'f > ...    .H     : /usr/bin/apt'\nexit 4\n"
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script = (
        hardening.integrity_update_script("apt")
        .replace(hardening.AIDE_DIR, str(root))
        .replace("/usr/bin/aide", str(bin_dir / "aide"))
        .replace(hardening_schema.PACKAGE_DATABASE["apt"], str(packages))
    )
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    packages.write_text("installed")
    (root / "aide.db.gz").write_text("old")
    os.utime(packages, (1_000_000, 1_000_000))  # the last install: before the database
    quiet = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True)
    assert quiet.returncode == 0 and not ran.exists(), quiet.stderr
    assert "no package changed" in quiet.stdout
    assert (root / "aide.db.gz").read_text() == "old" and not journal.exists()
    os.utime(packages)  # an upgrade rewrote it: now
    os.utime(root / "aide.db.gz", (1_000_000, 1_000_000))
    taken = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True)
    assert taken.returncode == 0 and ran.exists(), taken.stderr
    assert (root / "aide.db.gz").read_text() == "new\n"
    assert journal.read_text().splitlines()[1] == (
        "taken in by the automatic upgrades (apt-daily-upgrade.service): "
        "f > ...    .H     : /usr/bin/apt"
    )


@pytest.mark.parametrize("by", ["x/y", "a & b", "it's", "new\nline", ""])
def test_the_update_commands_description_goes_into_sed_only_when_plain(by: str) -> None:
    with pytest.raises(ValueError, match="not a plain description"):
        hardening.aide_update_command("apt", by)


# --- audit trail (auditd) ------------------------------------------------------------------


@pytest.mark.parametrize("distro", ALL)
def test_auditd_gets_gpunodes_rules_and_bounded_logs(distro: str) -> None:
    cfg = config(distro)
    run = run_roles(cfg, distro, fresh_responses(distro))
    assert not run.failed
    family = "apt" if distro in APT else "dnf"
    package = "auditd" if family == "apt" else "audit"
    assert any(re.search(rf"install.* {package}\b", c) for c in _installs(run))
    assert run.files[hardening.AUDIT_RULES] == hardening.render_audit_rules(cfg)
    assert run.files[hardening.AUDITD_CONF] == hardening.render_auditd_conf(cfg, family)
    for path in (hardening.AUDIT_RULES, hardening.AUDITD_CONF):
        assert run.grep(rf"^chmod 640 {re.escape(path)}$"), path
        assert run.grep(rf"^chown root:root {re.escape(path)}$"), path
    assert hardening.AUDIT_IMMUTABLE_RULES not in run.files
    load = run.commands.index(hardening.audit_load_command(cfg))
    assert run.commands.index(f"chmod 640 {hardening.AUDIT_RULES}") < load
    assert run.grep(r"^systemctl kill --signal=HUP auditd\.service$")
    assert run.grep(r"systemctl enable auditd\.service")


def test_audit_rules_can_be_locked_until_reboot() -> None:
    cfg = load_one({"distro": "debian12", "hardening": {"audit": {"immutable": True}}})
    run = run_roles(cfg, "debian12", fresh_responses("debian12"))
    assert content_lines(run.files[hardening.AUDIT_IMMUTABLE_RULES]) == ["-e 2"]
    assert "99-" in hardening.AUDIT_IMMUTABLE_RULES  # after every other rules file


def test_locked_rules_fail_the_load_with_the_reason(tmp_path: Path) -> None:
    """The load command under a real sh with auditctl saying the rules are locked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "auditctl").write_text("#!/bin/sh\necho 'enabled 2'\necho 'failure 1'\n")
    (bin_dir / "augenrules").write_text(f"#!/bin/sh\ntouch {tmp_path}/loaded\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    command = hardening.audit_load_command(config())
    command = re.sub(r"(?m)^for d in .*\n.*\ndone\n", "", command)  # no directories made here
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    done = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True)
    assert done.returncode == 1
    assert "locked until the next boot (hardening.audit.immutable)" in done.stderr
    assert not (tmp_path / "loaded").exists()
    (bin_dir / "auditctl").write_text("#!/bin/sh\necho 'enabled 1'\n")
    assert subprocess.run(["sh", "-c", command], env=env).returncode == 0
    assert (tmp_path / "loaded").exists()


def test_the_load_makes_each_missing_parent_of_a_watch_root_0755_first(tmp_path: Path) -> None:
    """auditctl refuses a watch whose directory does not exist: the load command's loop makes
    each missing parent (root 0755) and leaves an existing one as it is. Run under a real sh
    with the parents moved under a temporary directory."""
    need_root("giving the made directories to root")
    cfg = load_one(
        {
            "distro": "debian12",
            "vault": {"addr": "https://vault.example.net:8200"},
            "secrets": {"tok": {"path": "kv/data/t", "key": "v", "dest": "/etc/new-app/t.env"}},
        }
    )
    command = hardening.audit_load_command(cfg)
    (loop,) = re.findall(r"(?m)^for d in .*\n.*\ndone$", command)
    parents = shlex.split(loop.splitlines()[0].removeprefix("for d in ").removesuffix("; do"))
    assert "/etc/new-app" in parents and "/etc/gpunode" in parents
    moved = {p: tmp_path / p.lstrip("/") for p in parents}
    existing = moved["/etc/gpunode"]
    existing.mkdir(parents=True, mode=0o700)
    first, *rest = loop.splitlines()
    script = "\n".join(
        [f"for d in {' '.join(shlex.quote(str(moved[p])) for p in parents)}; do", *rest]
    )
    done = subprocess.run(["sh", "-ec", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    made = moved["/etc/new-app"]
    assert made.is_dir() and (made.stat().st_mode & 0o7777, made.stat().st_uid) == (0o755, 0)
    assert existing.stat().st_mode & 0o7777 == 0o700  # an existing one is left as it is


def test_in_a_container_auditd_is_a_notice(caplog) -> None:
    with caplog.at_level(logging.DEBUG, logger="pyinfra"):
        run = run_roles(config(), "debian12", fresh_responses("debian12"), container="lxc")
    assert hardening.AUDIT_RULES not in run.files
    assert not any(re.search(r"install.* auditd\b", c) for c in _installs(run))
    said = [r.getMessage() for r in caplog.records if "kernel's audit" in r.getMessage()]
    assert said and said[0].endswith(
        "the kernel's audit belongs to the machine underneath (lxc): auditd is not installed "
        "here; it is where the host boots its own kernel"
    )


def test_audit_turned_off_takes_gpunodes_rules_away() -> None:
    cfg = load_one({"distro": "debian12", "hardening": {"audit": {"enabled": False}}})
    on_host = converged({hardening.AUDIT_RULES: "-w /x -k y\n"}, {hardening.AUDIT_RULES: "640"})
    run = run_roles(cfg, "debian12", fresh_responses("debian12"), handlers=[on_host])
    assert run.grep(rf"^rm -f {re.escape(hardening.AUDIT_RULES)}$")
    assert not any(re.search(r"install.* auditd\b", c) for c in _installs(run))


# --- auditing from boot: the kernel's command line ------------------------------------------


def notices(caplog: pytest.LogCaptureFixture, about: str) -> list[str]:
    """What gpunode's ``notice`` operations said, about something."""
    said = [r.getMessage() for r in caplog.records if r.funcName == "notice"]
    return [message for message in said if about in message]


def audit_boot_run(
    caplog: pytest.LogCaptureFixture,
    distro: str,
    fact: list[str],
    on_host: dict[str, str] | None = None,
    **audit: Any,
) -> Run:
    cfg = load_one({"distro": distro, "hardening": {"audit": audit}})
    handlers = [converged(on_host, dict.fromkeys(on_host, "644"))] if on_host else []
    with caplog.at_level(logging.DEBUG, logger="pyinfra"):
        return run_roles(
            cfg, distro, {**fresh_responses(distro), AuditBoot().command(): fact}, handlers
        )


DROPIN = {hardening.AUDIT_GRUB_DROPIN: hardening.render_audit_grub_dropin()}


@pytest.mark.parametrize("distro", APT)
def test_audit_from_boot_goes_on_every_grub_entry(
    distro: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A host with update-grub and a stock grub.cfg: gpunode's drop-in (root 0644), then
    update-grub; the running kernel lacks the words, so the run says they come at the next
    boot."""
    run = audit_boot_run(caplog, distro, audit_boot("plain", "stock"))
    assert not run.failed
    assert run.files[hardening.AUDIT_GRUB_DROPIN] == hardening.render_audit_grub_dropin()
    dropin = re.escape(hardening.AUDIT_GRUB_DROPIN)
    assert run.grep(rf"^chmod 644 {dropin}$") and run.grep(rf"^chown root:root {dropin}$")
    assert first(run, rf"^chmod 644 {dropin}$") < first(run, r"^update-grub$")
    said = notices(caplog, "take effect at the next boot")
    assert said and said[0].endswith(
        "audit=1 audit_backlog_limit=8192 take effect at the next boot: until then, what "
        "started before auditd (systemd itself among them) is not audited"
    )


def test_a_host_booted_with_the_words_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """The drop-in in place, every grub.cfg entry with the words, the kernel booted with
    them: nothing to do and nothing to say."""
    run = audit_boot_run(caplog, "debian12", audit_boot("audit", "gpunode"), DROPIN)
    assert not run.failed
    assert hardening.AUDIT_GRUB_DROPIN not in run.files
    assert not run.grep(r"^update-grub$")
    assert not notices(caplog, "audit=1")


def test_update_grub_runs_again_while_an_entry_lacks_the_words(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The drop-in is there but grub.cfg was not made again (update-grub failed, or was
    interrupted, on the run that wrote it): this run does it."""
    run = audit_boot_run(caplog, "debian12", audit_boot("plain", "stock"), DROPIN)
    assert hardening.AUDIT_GRUB_DROPIN not in run.files
    assert run.grep(r"^update-grub$")


def test_a_later_setting_that_undoes_a_word_is_named_not_fought(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A site's GRUB_CMDLINE_LINUX_DEFAULT with audit=0 comes after gpunode's words on the
    normal entries (Debian 12's update-grub, recorded): running update-grub again would not
    change that, so it is not run; the run says which word is undone and where to look."""
    run = audit_boot_run(caplog, "debian12", audit_boot("plain", "override"), DROPIN)
    assert not run.failed and not run.grep(r"^update-grub$")
    said = notices(caplog, "undoes")
    assert said and said[0].endswith(
        f"{hardening.GRUB_CFG} has audit=1 audit_backlog_limit=8192, but a later setting on "
        "the same command line undoes audit=1 (the kernel takes the last value: look at "
        "GRUB_CMDLINE_LINUX_DEFAULT and /etc/default/grub.d)"
    )
    assert not notices(caplog, "next boot")


@pytest.mark.parametrize(
    ("distro", "fact", "how"),
    [
        (
            "debian12",
            audit_boot("plain", None, update_grub=False),
            "no update-grub on this host): until it has them, what starts before auditd "
            "(systemd itself among them) is not audited; add them where this host's boot loader "
            "sets the kernel's command line",
        ),
        (
            "debian12",
            audit_boot("plain", "stock", by_hand=True),
            "/boot/grub/grub.cfg is missing or not grub-mkconfig's, which update-grub would "
            "replace): until it has them, what starts before auditd (systemd itself among "
            "them) is not audited; add them where this host's boot loader sets the kernel's "
            "command line",
        ),
        (
            "rocky9",
            audit_boot("plain", None),
            "not on rocky9): until it has them, what starts before auditd (systemd itself "
            "among them) is not audited; grubby --update-kernel=ALL "
            "--args='audit=1 audit_backlog_limit=8192'",
        ),
    ],
)
def test_where_gpunode_does_not_set_the_boot_loader_a_notice_says_how(
    distro: str, fact: list[str], how: str, caplog: pytest.LogCaptureFixture
) -> None:
    run = audit_boot_run(caplog, distro, fact)
    assert not run.failed
    assert hardening.AUDIT_GRUB_DROPIN not in run.files and not run.grep(r"^update-grub$")
    said = notices(caplog, "gpunode does not set the kernel's command line")
    assert said and said[0].endswith(
        f"the running kernel lacks audit=1 audit_backlog_limit=8192, and gpunode does not set "
        f"the kernel's command line here ({how} "
        "(hardening.audit.boot_args: false silences this)"
    )
    caplog.clear()
    booted = audit_boot("audit", None, update_grub=False)
    audit_boot_run(caplog, distro, booted)
    assert not notices(caplog, "audit=1")  # booted with them (set by hand): nothing to say


def test_boot_args_off_takes_the_dropin_away_and_makes_grub_cfg_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    run = audit_boot_run(
        caplog, "debian12", audit_boot("audit", "gpunode"), DROPIN, boot_args=False
    )
    assert first(run, rf"^rm -f {re.escape(hardening.AUDIT_GRUB_DROPIN)}$") < first(
        run, r"^update-grub$"
    )
    assert not notices(caplog, "audit=1")
    caplog.clear()
    run = audit_boot_run(caplog, "debian12", audit_boot("plain", "stock"), boot_args=False)
    assert not run.grep(r"^update-grub$")  # no drop-in was there: nothing to make again
    caplog.clear()
    run = audit_boot_run(caplog, "debian12", audit_boot("audit", "gpunode"), DROPIN, enabled=False)
    assert first(run, rf"^rm -f {re.escape(hardening.AUDIT_GRUB_DROPIN)}$") < first(
        run, r"^update-grub$"
    )  # no audit at all: no audit from boot either


def test_audit_boot_reads_every_grub_entry_and_the_running_kernel() -> None:
    """The fact on the outputs recorded on Debian 12 (grub 2.06-13+deb12u2's update-grub, with
    and without gpunode's drop-in; the kernel's own /proc/cmdline under QEMU)."""
    stock = AuditBoot().process(audit_boot("plain", "stock"))
    assert stock["update_grub"] is True and stock["generated"] is True
    assert AuditBoot().process(audit_boot("plain", "stock", by_hand=True))["generated"] is False
    assert stock["running"] == ["console=ttyS0", "rdinit=/check", "panic=-1"]
    assert len(stock["entries"]) == 3  # the default, the advanced menu's, its recovery
    assert [hardening.boot_args_off(e) for e in stock["entries"]] == [
        ["audit=1", "audit_backlog_limit=8192"]
    ] * 3
    made = AuditBoot().process(audit_boot("audit", "gpunode"))
    assert made["entries"][2][-3:] == ["single", "audit=1", "audit_backlog_limit=8192"]
    assert all(hardening.boot_args_off(e) == [] for e in [made["running"], *made["entries"]])
    assert AuditBoot().process(["update-grub=no", "running=ro -- audit=1"])["running"] == ["ro"]


@pytest.mark.parametrize(
    ("words", "off"),
    [
        ("ro audit=1 audit_backlog_limit=8192 quiet", []),
        ("ro audit=1 audit_backlog_limit=8192 audit=0", ["audit=1"]),  # the last one counts
        ("ro audit=0 audit=1 audit_backlog_limit=64 audit_backlog_limit=8192", []),
        ("ro audit=1 audit_backlog_limit=81920", ["audit_backlog_limit=8192"]),
        ("ro xaudit=1", ["audit=1", "audit_backlog_limit=8192"]),
        ("", ["audit=1", "audit_backlog_limit=8192"]),
    ],
)
def test_the_words_in_effect_are_the_last_of_their_name(words: str, off: list[str]) -> None:
    assert hardening.boot_args_off(words.split()) == off


def test_the_grub_dropin_is_the_one_update_grub_read_and_sh_appends_it() -> None:
    """What gpunode writes is what Debian 12's update-grub was run with (the recorded
    drop-in), and grub-mkconfig's sh, sourcing it, appends the words to what came before."""
    text = hardening.render_audit_grub_dropin()
    assert content_lines(text) == content_lines(fixture("grub-dropin.recorded"))
    with tempfile.TemporaryDirectory() as work:
        dropin = Path(work) / "60-gpunode-audit.cfg"
        dropin.write_text(text)
        script = 'GRUB_CMDLINE_LINUX="$1"; . "$2"; printf %s "$GRUB_CMDLINE_LINUX"'
        for before in ("", "console=ttyS0 net.ifnames=0"):
            done = subprocess.run(
                ["sh", "-c", script, "sh", before, str(dropin)], capture_output=True, text=True
            )
            assert done.stdout.split() == [*before.split(), "audit=1", "audit_backlog_limit=8192"]


@pytest.mark.parametrize(("rollback", "timeout"), [(60, 15.0), (20, 10.0), (24, 12.0)])
def test_the_confirmation_waits_half_the_rollback_at_most_15_s(
    rollback: int, timeout: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new connection is tried for half the rollback time (it must succeed well before the
    timer fires), and never longer than 15 s."""
    import roles.firewall as firewall_role

    asked: list[float] = []

    def confirm(state: Any, host: Any, timeout: float) -> bool:
        asked.append(timeout)
        return True

    monkeypatch.setattr(firewall_role, "confirm_new_connection", confirm)
    cfg = config(rollback_seconds=rollback)
    run = run_roles(cfg, "debian12", fresh_responses("debian12"), deploys=(firewall,))
    assert not run.failed
    assert asked == [timeout]


# --- logins: login.defs, password aging, pam_tmpdir -------------------------------------------


def _apply_to_copy(command: str, tmp_path: Path) -> dict[str, str]:
    """Run the role's login.defs command with a real sh on a copy of the recorded file; the
    KeyValues fact reads the result back."""
    copy = tmp_path / "login.defs"
    copy.write_text("\n".join(lines("login-defs.fresh")) + "\n")
    script = command.replace(hardening.LOGIN_DEFS, str(copy))
    subprocess.run(["sh", "-c", script], check=True)
    return KeyValues().process(copy.read_text().splitlines())


def test_login_defs_get_their_values_and_keep_the_rest(tmp_path: Path) -> None:
    """On Debian 12's stock login.defs (EL9's has the same KEY value form)."""
    distro = "debian12"
    cfg = config(distro)
    run = run_roles(cfg, distro, fresh_responses(distro))
    (command,) = run.grep(rf"^(sed|printf) .*{re.escape(hardening.LOGIN_DEFS)}$")
    after = _apply_to_copy(command, tmp_path)
    assert {k: after.get(k) for k in hardening.login_defs(cfg)} == hardening.login_defs(cfg)
    assert hardening.login_defs(cfg) == {  # the defaults, written out (docs/reference.md)
        "UMASK": "027",
        "PASS_MAX_DAYS": "365",
        "PASS_MIN_DAYS": "1",
        "PASS_WARN_AGE": "7",
        "ENCRYPT_METHOD": "SHA512",
        "SHA_CRYPT_MIN_ROUNDS": "65536",
        "SHA_CRYPT_MAX_ROUNDS": "65536",
    }
    before = KeyValues().process(lines("login-defs.fresh"))
    # the distro's other settings are untouched, its comments kept
    managed = hardening.login_defs(cfg)
    assert {k: v for k, v in after.items() if k not in managed} == {
        k: v for k, v in before.items() if k not in managed
    }
    kept = (tmp_path / "login.defs").read_text()
    assert "# /etc/login.defs - Configuration control definitions" in kept
    # converged: the fact reads the values back, and nothing is run
    converged = {
        **fresh_responses(distro),
        KeyValues().command(hardening.LOGIN_DEFS): (tmp_path / "login.defs")
        .read_text()
        .splitlines(),
    }
    again = run_roles(cfg, distro, converged)
    assert not again.grep(rf"^(sed|printf) .*{re.escape(hardening.LOGIN_DEFS)}$")


def test_login_defs_take_each_value_from_its_own_key() -> None:
    login = {
        "umask": "077",
        "password_max_days": 90,
        "password_min_days": 2,
        "password_warn_days": 14,
        "hash_rounds": 100000,
    }
    cfg = load_one({"distro": "debian12", "hardening": {"login": login}})
    assert hardening.login_defs(cfg) == {
        "UMASK": "077",
        "PASS_MAX_DAYS": "90",
        "PASS_MIN_DAYS": "2",
        "PASS_WARN_AGE": "14",
        "ENCRYPT_METHOD": "SHA512",
        "SHA_CRYPT_MIN_ROUNDS": "100000",
        "SHA_CRYPT_MAX_ROUNDS": "100000",
    }
    assert hardening.render_profile_umask(cfg) == (
        "# The login shells' umask, from hardening.login.umask. Written by gpunode.\numask 077\n"
    )


def test_a_key_that_is_set_twice_is_rewritten_on_every_line(tmp_path: Path) -> None:
    copy = tmp_path / "login.defs"
    copy.write_text("UMASK 022\n# UMASK 077 (a comment stays)\n  UMASK\t002\nUMASKX 1\n")
    run = run_roles(
        config(),
        "debian12",
        {
            **fresh_responses("debian12"),
            KeyValues().command(hardening.LOGIN_DEFS): copy.read_text().splitlines(),
        },
    )
    (command,) = run.grep(rf"^(sed|printf) .*{re.escape(hardening.LOGIN_DEFS)}$")
    subprocess.run(["sh", "-c", command.replace(hardening.LOGIN_DEFS, str(copy))], check=True)
    text = copy.read_text().splitlines()
    assert text[:4] == ["UMASK\t027", "# UMASK 077 (a comment stays)", "UMASK\t027", "UMASKX 1"]


def test_login_shells_umask_file(tmp_path: Path) -> None:
    cfg = load_one({"distro": "debian12", "hardening": {"login": {"umask": "077"}}})
    run = run_roles(cfg, "debian12", fresh_responses("debian12"))
    script = run.files[hardening.PROFILE_UMASK]
    out = subprocess.run(
        ["sh", "-c", "umask 022; . /dev/stdin; umask"],
        input=script,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "0077"


# /etc/shadow lines of accounts with a password (hashes made with `openssl passwd -6`) and
# one without; PasswordAccounts' real command runs on them (awk over a copy).
SHADOW = [
    "root:*:19700:0:99999:7:::",
    "alice:$6$Q0Yk1c1E$x4uWc3VnS3Kk0d9kqj0jvJ7E0pWm3bb8U9eXb7lGxS1:19700:0:99999:7:::",
    "bob:$y$j9T$abc$def:19700:1:365:7:::",
    "locked:!$6$abc$def:19700:0:99999:7:::",
    "ops:$6$salt$hash:19700:0:99999:7:::",
]


def _password_accounts(tmp_path: Path) -> list[str]:
    shadow = tmp_path / "shadow"
    shadow.write_text("\n".join(SHADOW) + "\n")
    command = PasswordAccounts().command().replace("/etc/shadow", str(shadow))
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_accounts_with_a_password_are_aged_but_not_the_connection_user(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    accounts = _password_accounts(tmp_path)
    assert PasswordAccounts().process(accounts) == {
        "alice": {"min": "0", "max": "99999", "warn": "7"},
        "bob": {"min": "1", "max": "365", "warn": "7"},
        "ops": {"min": "0", "max": "99999", "warn": "7"},
    }
    responses = {
        **fresh_responses("debian12"),
        PasswordAccounts().command(): accounts,
        PrimaryGroup().command("ops"): "ops",
    }
    with caplog.at_level(logging.DEBUG, logger="pyinfra"):
        run = run_roles(config(), "debian12", responses, host_data={"ssh_user": "ops"})
    # bob has the aging already; ops is the account gpunode connects as; root has no password
    assert run.grep(r"^chage ") == ["chage -m 1 -M 365 -W 7 -- alice"]
    notes = [
        r.getMessage() for r in caplog.records if "connects as, has a password" in r.getMessage()
    ]
    assert notes and notes[0].endswith(
        "ops, the account gpunode connects as, has a password: its aging is left as it is "
        "(an expired password would refuse its SSH key too)"
    )


def test_private_tmpdir_is_packaged_on_apt_and_a_notice_on_el(
    caplog: pytest.LogCaptureFixture,
) -> None:
    run = run_roles(config(), "debian12", fresh_responses("debian12"))
    assert run.grep(r"apt-get .*install.* libpam-tmpdir")
    with caplog.at_level(logging.DEBUG, logger="pyinfra"):
        el = run_roles(config("rhel9"), "rhel9", fresh_responses("rhel9"))
    assert not el.grep(r"pam-tmpdir|pam_tmpdir")
    assert [r for r in caplog.records if "pam_tmpdir is not packaged on rhel9" in r.getMessage()]
    off = load_one({"distro": "debian12", "hardening": {"login": {"private_tmp": False}}})
    run = run_roles(off, "debian12", fresh_responses("debian12"))
    assert not run.grep(r"install.* libpam-tmpdir")


@pytest.mark.parametrize(
    ("login", "says"),
    [
        ({"password_min_days": 30, "password_max_days": 7}, "allowed: min <= max"),
        ({"password_warn_days": 7, "password_max_days": 7}, "allowed: warn < max"),
        ({"umask": "0022"}, "hardening.login.umask"),
        ({"hash_rounds": 1000}, "hardening.login.hash_rounds"),
        ({"umask": "027\nUMASK 000"}, "hardening.login.umask"),
    ],
)
def test_bad_login_settings_are_refused_at_load(login: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_one({"distro": "debian12", "hardening": {"login": login}})
    assert says in str(err.value), str(err.value)
    assert "Traceback" not in str(err.value)


def test_key_values_refuses_what_is_not_a_key_and_a_word() -> None:
    from gpunode.operations.hardening import key_values  # noqa: PLC0415

    with pytest.raises(OperationValueError):
        key_values._inner(path="/etc/login.defs", values={"UMASK": "027; reboot"}).__next__()


@pytest.mark.parametrize("distro", ["debian12", "rhel9"])
def test_a_firewall_directory_owned_by_another_user_is_given_back_to_root(distro: str) -> None:
    """The directory exists, root-only by mode but owned by someone else (what `make mutate`
    found: on a fresh host the candidate's upload makes the directory root's anyway, so a
    role that named no owner for it passed)."""
    directory = Directory().command(path=firewall_rules.FIREWALL_DIR).get_raw_value()
    stat = (
        "user=nobody group=nogroup mode=drwx------ atime=1 mtime=1 ctime=1 size=4096 "
        f"'{firewall_rules.FIREWALL_DIR}'"
    )
    responses = {**fresh_responses(distro), directory: [stat]}
    _, run = firewall_ops(config(distro), distro, responses)
    assert not run.failed
    assert not run.grep(rf"^mkdir -p {firewall_rules.FIREWALL_DIR}$")  # it is there
    assert run.grep(rf"^chown root:root {firewall_rules.FIREWALL_DIR}$")
    assert not run.grep(rf"^chmod [0-7]+ {firewall_rules.FIREWALL_DIR}$")  # its mode is right
