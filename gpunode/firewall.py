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
from urllib.parse import urlsplit

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
    groups += gateway_upstream_groups(config)
    rules = []
    for name, ports, cidrs in groups:
        for proto in ("tcp", "udp"):
            wanted = tuple(sorted({p for pr, p in ports if pr == proto}))
            if wanted and cidrs:
                rules.append(Allow(name, proto, wanted, tuple(cidrs)))
    return rules


def gateway_upstream_groups(
    config: NodeConfig,
) -> list[tuple[str, Iterable[tuple[str, int]], list[Network]]]:
    """On an upstream of gateways on other hosts: each fronted service's port, open to those
    gateways' addresses only (services with the same gateways share a rule)."""
    by_sources: dict[tuple[str, ...], list[tuple[str, int]]] = {}
    services = config.inference.services
    for name, addresses in sorted(config.gateway_sources.items()):
        by_sources.setdefault(tuple(sorted(addresses)), []).append(("tcp", services[name].port))
    return [
        ("gateway", ports, [ipaddress.ip_network(a) for a in addresses])
        for addresses, ports in by_sources.items()
    ]


# --- egress: the output chain as an allow-list ---------------------------------------------

EGRESS_COUNTER = "egress_dropped"  # named counter of what the output chain drops
NTP_PORT, DNS_PORT = 123, 53
_URL_PORTS = {"http": 80, "https": 443}


def _url(url: str | None) -> tuple[str, int] | None:
    """(host, port) of an http(s) URL, the port defaulted by its scheme."""
    if not url:
        return None
    parts = urlsplit(url)
    try:
        port = parts.port or _URL_PORTS[parts.scheme]
    except (ValueError, KeyError):
        return None  # the schema refuses such URLs; nothing to open
    return (parts.hostname.lower(), port) if parts.hostname else None


def egress_servers(config: NodeConfig) -> list[tuple[str, str, str, int]]:
    """(key, host, proto, port) of every server the node connects to that the output chain
    allows: NTP, the package proxy (or, without one, the mirrors), Vault and the central log
    host."""
    out = [("base.ntp_servers", s.lower(), "udp", NTP_PORT) for s in config.base.ntp_servers]
    proxy = _url(config.base.apt_proxy)
    mirrors = [
        ("base.apt_mirror", config.base.apt_mirror),
        ("nvidia.mirror", config.nvidia.mirror),
        ("cuda.container_toolkit_mirror", config.cuda.container_toolkit_mirror),
        ("nomad.repo_url", config.nomad.repo_url),
    ]
    out += [
        ("gateway.upstreams", remote.address, "tcp", remote.port)
        for remote in config.upstream_servers
    ]
    if proxy:  # apt and dnf fetch every repository (http and https) through it
        out.append(("base.apt_proxy", proxy[0], "tcp", proxy[1]))
    else:
        for key, url in mirrors:
            where = _url(url)
            if where:
                out.append((key, where[0], "tcp", where[1]))
    vault = _url(config.vault.addr)
    if vault:
        out.append(("vault.addr", vault[0], "tcp", vault[1]))
    logs = config.hardening.remote_logs
    if logs is not None and config.hardening.enabled:
        out.append(("hardening.remote_logs.host", logs.host, "tcp", logs.port))
    return out


def _literal(host: str) -> Network | None:
    """The host as a network of one address; None for a DNS name. Hosts come without
    brackets: NTP names by pattern, URL hosts from ``urlsplit().hostname``, the rest canonical."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return ipaddress.ip_network(address)


ANYWHERE = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


def egress_rules(config: NodeConfig) -> list[Allow]:
    """Every (destinations, ports) pair the output chain accepts with egress on, in order.
    A server named by DNS name takes its CIDRs from ``firewall.egress.addresses`` (a name
    that is not there is a config error, see check_host); loopback needs no rule."""
    eg = config.firewall.egress
    groups: dict[tuple[str, str], tuple[set[int], list[Network]]] = {}

    def add(name: str, proto: str, port: int, cidrs: Iterable[Network]) -> None:
        ports, nets = groups.setdefault((name, proto), (set(), []))
        ports.add(port)
        for cidr in cidrs:
            if cidr not in nets and not cidr.is_loopback:
                nets.append(cidr)

    for proto in ("udp", "tcp"):
        add(
            "firewall.egress.dns_cidrs",
            proto,
            DNS_PORT,
            ANYWHERE if eg.dns_cidrs is None else eg.dns_cidrs,
        )
    for key, host, proto, port in egress_servers(config):
        literal = _literal(host)
        cidrs = [literal] if literal else eg.addresses.get(host, [])
        add(key, proto, port, cidrs)
    for rule in eg.extra:
        add(rule.name, rule.proto, rule.port, rule.cidrs)
    return [
        Allow(name, proto, tuple(sorted(ports)), tuple(nets))
        for (name, proto), (ports, nets) in groups.items()
        if nets
    ]


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
            egress=egress_rules(config) if fw.egress.enabled else None,
            counter=EGRESS_COUNTER,
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


# The network: key that opens each kind of service the node serves, what serves it, and
# an example value for the message.
EXPOSED: tuple[tuple[str, str, str], ...] = (
    ("app_cidrs", "inference services (inference.services)", "[198.51.100.0/24]"),
    ("monitoring_cidrs", "metrics exporters (monitoring.*)", "[192.0.2.16/28]"),
    ("cluster_cidrs", "the Nomad client (nomad.enabled)", "[192.0.2.32/28]"),
)


def exposed_ports(config: NodeConfig) -> dict[str, list[tuple[str, int]]]:
    """network: key -> the (protocol, port) pairs the node serves that it opens."""
    return {
        "app_cidrs": list(inference.app_ports(config)),
        "monitoring_cidrs": list(monitoring.metrics_ports(config)),
        "cluster_cidrs": list(nomad.cluster_ports(config)),
    }


def check_host(where: str, config: NodeConfig, connection: Connection) -> list[str]:
    """Checks that need the merged config (and the host's connection); [] when fine."""
    problems: list[str] = []
    fw = config.firewall
    if not fw.enabled:
        return problems  # said explicitly (the default is on): announced on every run
    if not config.network.admin_cidrs:
        problems.append(
            f"{where}: network.admin_cidrs: empty while the firewall is on (firewall.enabled "
            "defaults to true): nobody could reach SSH (allowed: the CIDRs SSH comes from, "
            "e.g. [192.0.2.0/28]; or firewall.enabled: false to run the node without "
            "gpunode's firewall)"
        )
        return problems
    ports = exposed_ports(config)
    for key, what, example in EXPOSED:
        if ports[key] and key not in config.network.model_fields_set:
            listed = ", ".join(f"{proto}/{port}" for proto, port in ports[key])
            problems.append(
                f"{where}: network.{key}: not set while the node serves {what} on {listed} "
                f"and the firewall is on (allowed: the CIDRs that may reach them, e.g. "
                f"{example}; [] to close them to every address; or firewall.enabled: false "
                "to run the node without gpunode's firewall)"
            )
    if fw.egress.enabled:
        problems += _check_egress(where, config)
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


def _check_egress(where: str, config: NodeConfig) -> list[str]:
    problems = []
    eg = config.firewall.egress
    servers = egress_servers(config)
    not_packages = ("base.ntp_servers", "vault.addr", "hardening.remote_logs.host")
    if not any(key not in not_packages for key, *_ in servers):
        problems.append(
            f"{where}: firewall.egress.enabled: the node would fetch packages from its distro's "
            "default mirrors, whose addresses no rule can hold (allowed: set base.apt_proxy, "
            "or a mirror URL such as base.apt_mirror)"
        )
    missing: dict[str, list[str]] = {}
    for key, host, _, _ in servers:
        if not _literal(host) and host not in eg.addresses:
            missing.setdefault(host, []).append(key)
    for host, keys in missing.items():
        problems.append(
            f"{where}: firewall.egress.addresses: {host} ({', '.join(dict.fromkeys(keys))}) is "
            "a DNS name and nft rules hold addresses; gpunode does not resolve it "
            f"(allowed: list its CIDRs, e.g. {host}: [192.0.2.50/32], or give the server "
            "by IP address)"
        )
    return problems


def warnings(config: NodeConfig) -> list[str]:
    """What every run prints about this node's firewall (gpunode/inventory.py's report)."""
    if config.firewall.enabled:
        return []
    return [
        "firewall.enabled is false: no gpunode firewall, every port these nodes listen on "
        "answers any address"
    ]


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
