"""The firewall: gpunode's nftables ruleset rendered from a node's config, the names it
uses on the node, and the anti-lockout check at config load.

roles/firewall.py applies the ruleset; the ``firewall:`` section is in
gpunode/schema/firewall.py, the CIDRs in gpunode/schema/network.py.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from gpunode import inference, monitoring, nomad
from gpunode.render import environment
from gpunode.schema.node import Connection, NodeConfig

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# --- fixed names on the node ----------------------------------------------------------

NFT_TABLE = "gpunode"  # `table inet gpunode`: the only table gpunode touches
FIREWALL_DIR = "/etc/gpunode/firewall"
FIREWALL_ACTIVE = f"{FIREWALL_DIR}/gpunode.nft"  # the confirmed ruleset, loaded at boot
FIREWALL_CANDIDATE = f"{FIREWALL_DIR}/candidate.nft"  # the ruleset being tried
FIREWALL_ROLLBACK = f"{FIREWALL_DIR}/rollback.nft"  # what the rollback timer restores
FIREWALL_LIVE_SHA = f"{FIREWALL_DIR}/live.sha1"  # sha1 of `nft -s list table` when confirmed
FIREWALL_UNIT = "gpunode-firewall.service"  # loads FIREWALL_ACTIVE at boot
ROLLBACK_UNIT = "gpunode-firewall-rollback"  # transient timer + service (systemd-run)

# Firewalls that would fight gpunode's table (their own drop rules), stopped and disabled
# when present. Neither is active on a stock Debian/Ubuntu server; firewalld is on EL9.
CONFLICTING_FIREWALLS: dict[str, tuple[str, ...]] = {
    "apt": ("ufw.service", "firewalld.service"),
    "dnf": ("firewalld.service",),
}


@dataclass(frozen=True)
class Allow:
    """Sources that may reach some ports: one accept rule per address family."""

    name: str
    proto: str
    ports: tuple[int, ...]
    cidrs: tuple[Network, ...]

    @property
    def v4(self) -> list[str]:
        return [str(c) for c in self.cidrs if c.version == 4]

    @property
    def v6(self) -> list[str]:
        return [str(c) for c in self.cidrs if c.version == 6]


def allow_rules(config: NodeConfig, ssh_port: int) -> list[Allow]:
    """Every (sources, ports) pair the input chain accepts, in ruleset order."""
    net = config.network
    groups: list[tuple[str, Iterable[tuple[str, int]], list[Network]]] = [
        ("ssh", [("tcp", ssh_port)], net.admin_cidrs),
        ("inference", inference.app_ports(config), net.app_cidrs),
        ("metrics", monitoring.metrics_ports(config), net.monitoring_cidrs),
        ("cluster", nomad.cluster_ports(config), net.cluster_cidrs),
    ]
    groups += [(r.name, [(r.proto, r.port)], r.cidrs) for r in config.firewall.extra_input]
    rules = []
    for name, ports, cidrs in groups:
        for proto in ("tcp", "udp"):
            wanted = tuple(sorted({p for pr, p in ports if pr == proto}))
            if wanted and cidrs:
                rules.append(Allow(name, proto, wanted, tuple(cidrs)))
    return rules


def render_ruleset(config: NodeConfig, ssh_port: int) -> str:
    """The nft script that atomically replaces gpunode's table (and touches nothing else)."""
    fw = config.firewall
    return (
        environment("firewall")
        .get_template("gpunode.nft.j2")
        .render(
            table=NFT_TABLE,
            fw=fw,
            rules=allow_rules(config, ssh_port),
            published=[r for r in allow_rules(config, ssh_port) if r.name != "ssh"],
        )
    )


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()  # noqa: S324 - a content id, as pyinfra's


# --- config checks ---------------------------------------------------------------------

_DOCUMENTATION = tuple(
    ipaddress.ip_network(n)
    for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
)


def controller_source(
    address: str, port: int
) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address this machine sends from towards ``address`` (a UDP connect: the kernel
    picks the route and source; no packet is sent). None when it cannot tell."""
    try:
        infos = socket.getaddrinfo(address, port, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError):
        return None
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.connect(sockaddr)
                return ipaddress.ip_address(sock.getsockname()[0].split("%", 1)[0])
        except OSError:
            continue
    return None


def check_host(where: str, config: NodeConfig, connection: Connection) -> list[str]:
    """Checks that need the merged config (and the host's connection); [] when fine."""
    problems: list[str] = []
    fw = config.firewall
    if not fw.enabled:
        return problems
    if not config.network.admin_cidrs:
        problems.append(
            f"{where}: network.admin_cidrs: empty while firewall.enabled is true: nobody could "
            "reach SSH (allowed: the CIDRs SSH comes from, e.g. [192.0.2.0/28])"
        )
        return problems
    for rule in fw.extra_input:
        if rule.port == connection.port:
            problems.append(
                f"{where}: firewall.extra_input: rule {rule.name}: port {rule.port} is the SSH "
                "port, which network.admin_cidrs controls (allowed: any other port)"
            )
    if fw.force_admin_cidrs or connection.ssh_config_file:
        return problems  # forced; or an ssh_config (ProxyJump?): the node sees another source
    try:
        target = ipaddress.ip_address(connection.address)
        if any(target in net for net in _DOCUMENTATION):
            return problems  # documentation placeholders (RFC 5737/3849) are never real hosts
    except ValueError:
        pass  # a DNS name: resolved below
    source = controller_source(connection.address, connection.port)
    if source is None:
        return problems  # no route or no such name: the connection will say so
    if not any(source in net for net in config.network.admin_cidrs):
        cidrs = ", ".join(str(n) for n in config.network.admin_cidrs)
        problems.append(
            f"{where}: network.admin_cidrs: this controller reaches {connection.address} from "
            f"{source}, which none of [{cidrs}] covers: the firewall would lock it out "
            f"(allowed: add a CIDR that covers {source}, or set firewall.force_admin_cidrs: true "
            "when the node sees another address, e.g. behind NAT)"
        )
    return problems


# The stateless listing of gpunode's table, hashed the same way FirewallState hashes it.
LIVE_SHA1 = (
    f'live=$(nft -s list table inet {NFT_TABLE}) && printf "%s\\n" "$live" | sha1sum | '
    "cut -d' ' -f1"
)


def arm_rollback_command(seconds: int) -> str:
    """Save the running gpunode table as a restore script and start a timer that loads it.

    The script deletes gpunode's table and re-creates it as it was (or leaves it deleted
    when there was none); it is checked with ``nft -c`` before the timer is armed. A
    rollback still armed by an earlier run that never confirmed keeps its saved table:
    that one is the last confirmed ruleset, not what the unconfirmed run loaded.
    """
    timer = f"{ROLLBACK_UNIT}.timer"
    return "\n".join(
        [
            "set -e",
            f"if ! systemctl is-active --quiet {timer} || [ ! -s {FIREWALL_ROLLBACK} ]; then",
            f"  {{ echo 'table inet {NFT_TABLE}'; echo 'delete table inet {NFT_TABLE}'; "
            f"nft list table inet {NFT_TABLE} 2>/dev/null || true; }} > {FIREWALL_ROLLBACK}.tmp",
            f"  mv {FIREWALL_ROLLBACK}.tmp {FIREWALL_ROLLBACK}",
            "fi",
            f"nft -c -f {FIREWALL_ROLLBACK}",
            f"systemctl stop {timer} 2>/dev/null || true",
            f"systemctl reset-failed {timer} {ROLLBACK_UNIT}.service 2>/dev/null || true",
            f"systemd-run --quiet --unit={ROLLBACK_UNIT} --on-active={seconds}s "
            "--timer-property=AccuracySec=1s "
            "--description='gpunode: restore the previous firewall' "
            f"/usr/sbin/nft -f {FIREWALL_ROLLBACK}",
        ]
    )


CONFIRM_COMMAND = " && ".join(
    [
        f"{{ systemctl is-active --quiet {ROLLBACK_UNIT}.timer || {{ echo 'gpunode: the "
        "rollback timer fired before the new ruleset was confirmed: the node runs its "
        "previous firewall' >&2; exit 1; }; }",
        f"systemctl stop {ROLLBACK_UNIT}.timer",
        f"install -m 600 {FIREWALL_CANDIDATE} {FIREWALL_ACTIVE}",
        f"rm -f {FIREWALL_CANDIDATE}",
        f"{LIVE_SHA1} > {FIREWALL_LIVE_SHA}",
    ]
)
