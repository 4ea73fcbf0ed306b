"""Host and network hardening: firewall, sshd, sysctl and OS controls as data.

Every default is here: the section models (``firewall:`` and ``hardening:`` in
the inventory) and the tables the roles render (sshd options, sysctl keys,
packages that must be absent, files with strict modes). roles/firewall.py and
roles/hardening.py only apply them; tests/host/test_hardening.py checks them.

Reference level: dev-sec's ssh-baseline and linux-baseline and the CIS
benchmarks for Debian 12 / Ubuntu 24.04. Where they disagree the choice and
the reason are next to the value (and in the README's "Hardening" section).

.. code:: yaml

    network:
      admin_cidrs: [192.0.2.0/28]        # SSH
      app_cidrs: [198.51.100.0/24]       # inference ports
    firewall:
      enabled: true
      extra_input:
        - {name: node-api, proto: tcp, port: 8443, cidrs: [192.0.2.0/28]}
    hardening:
      ssh: {permit_root_login: prohibit-password}
      sysctl: {net.ipv4.tcp_timestamps: 0}
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

import jinja2
from pydantic import Field, StringConstraints, field_validator

from gpunode.paths import TEMPLATES
from gpunode.schema import Cidr, Model

if TYPE_CHECKING:
    from gpunode.config import Connection, NodeConfig

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Port = Annotated[int, Field(ge=1, le=65535)]
Rate = Annotated[str, StringConstraints(pattern=r"^[1-9][0-9]{0,5}/(second|minute|hour)$")]
RuleName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")]
# nft interface names: up to 15 characters, a trailing * is a wildcard (br-*)
IfName = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9_.-]{1,15}\*?$")]
SysctlKey = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]+(\.[a-zA-Z0-9_-]+)+$")]
SysctlValue = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
SshAlgorithm = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9.@-]*$")]

# --- fixed names on the node ----------------------------------------------------------

NFT_TABLE = "gpunode"  # `table inet gpunode`: the only table gpunode touches
FIREWALL_DIR = "/etc/gpunode/firewall"
FIREWALL_ACTIVE = f"{FIREWALL_DIR}/gpunode.nft"  # the confirmed ruleset, loaded at boot
FIREWALL_CANDIDATE = f"{FIREWALL_DIR}/candidate.nft"  # the ruleset being tried
FIREWALL_ROLLBACK = f"{FIREWALL_DIR}/rollback.nft"  # what the rollback timer restores
FIREWALL_LIVE_SHA = f"{FIREWALL_DIR}/live.sha1"  # sha1 of `nft -s list table` when confirmed
FIREWALL_UNIT = "gpunode-firewall.service"  # loads FIREWALL_ACTIVE at boot
ROLLBACK_UNIT = "gpunode-firewall-rollback"  # transient timer + service (systemd-run)
SSHD_DROPIN = "/etc/ssh/sshd_config.d/00-gpunode.conf"  # first match wins: sorts first
SSHD_STAGED = "/etc/gpunode/sshd/00-gpunode.conf"  # validated here before it goes live
SYSCTL_FILE = "/etc/sysctl.d/60-gpunode-hardening.conf"
CORE_LIMITS_FILE = "/etc/security/limits.d/60-gpunode-core.conf"
COREDUMP_DROPIN = "/etc/systemd/coredump.conf.d/60-gpunode.conf"

# --- sshd (dev-sec ssh-baseline) -------------------------------------------------------

# Algorithms every supported sshd knows (OpenSSH 8.7 on EL9 is the oldest): an unknown
# name makes `sshd -t` fail, so the role would refuse the config rather than break sshd.
SSH_CIPHERS = (
    "chacha20-poly1305@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-gcm@openssh.com",
    "aes256-ctr",
    "aes192-ctr",
    "aes128-ctr",
)
SSH_KEX = (
    "sntrup761x25519-sha512@openssh.com",  # post-quantum hybrid, OpenSSH >= 8.5
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group18-sha512",
    "diffie-hellman-group-exchange-sha256",
)
SSH_MACS = (
    "hmac-sha2-512-etm@openssh.com",
    "hmac-sha2-256-etm@openssh.com",
    "umac-128-etm@openssh.com",
    "hmac-sha2-512",
    "hmac-sha2-256",
)

# Options gpunode always sets (sshd -T names, lowercase). The ones users may change are
# in the Ssh model below and are added by sshd_options().
SSHD_FIXED: dict[str, str] = {
    "passwordauthentication": "no",
    "kbdinteractiveauthentication": "no",
    "permitemptypasswords": "no",
    "pubkeyauthentication": "yes",
    "hostbasedauthentication": "no",
    "ignorerhosts": "yes",
    "allowtcpforwarding": "no",
    "allowagentforwarding": "no",
    "allowstreamlocalforwarding": "no",
    "x11forwarding": "no",
    "permittunnel": "no",
    "gatewayports": "no",
    "permituserenvironment": "no",
    "strictmodes": "yes",
    "usedns": "no",
    "compression": "no",
    "printlastlog": "yes",
    "loglevel": "VERBOSE",
}

# --- sysctl (dev-sec linux-baseline, CIS 3.3 / 1.5) --------------------------------------

# Per network namespace: writable inside the lab's containers too.
SYSCTL_NETWORK: dict[str, int] = {
    "net.ipv4.ip_forward": 0,  # 1 with firewall.containers (see CONTAINER_SYSCTL)
    "net.ipv6.conf.all.forwarding": 0,
    "net.ipv4.conf.all.accept_redirects": 0,
    "net.ipv4.conf.default.accept_redirects": 0,
    "net.ipv6.conf.all.accept_redirects": 0,
    "net.ipv6.conf.default.accept_redirects": 0,
    "net.ipv4.conf.all.secure_redirects": 0,
    "net.ipv4.conf.default.secure_redirects": 0,
    "net.ipv4.conf.all.send_redirects": 0,
    "net.ipv4.conf.default.send_redirects": 0,
    "net.ipv4.conf.all.accept_source_route": 0,
    "net.ipv4.conf.default.accept_source_route": 0,
    "net.ipv6.conf.all.accept_source_route": 0,
    "net.ipv6.conf.default.accept_source_route": 0,
    "net.ipv4.conf.all.rp_filter": 1,  # strict; 2 (loose) with firewall.containers
    "net.ipv4.conf.default.rp_filter": 1,
    "net.ipv4.conf.all.log_martians": 1,
    "net.ipv4.conf.default.log_martians": 1,
    "net.ipv4.icmp_echo_ignore_broadcasts": 1,
    "net.ipv4.icmp_ignore_bogus_error_responses": 1,
    "net.ipv4.tcp_syncookies": 1,
    "net.ipv6.conf.all.accept_ra": 0,  # servers get static addresses and routes
    "net.ipv6.conf.default.accept_ra": 0,
}
# Kernel-wide: read-only inside a container (persisted anyway, applied where writable).
SYSCTL_KERNEL: dict[str, int] = {
    "kernel.randomize_va_space": 2,  # full ASLR
    "kernel.kptr_restrict": 2,  # no kernel pointers in /proc, not even for root
    "kernel.dmesg_restrict": 1,
    "kernel.sysrq": 0,
    "fs.suid_dumpable": 0,  # no core dumps of setuid programs
    "fs.protected_hardlinks": 1,
    "fs.protected_symlinks": 1,
}
# A node that runs containers routes their traffic: forwarding on, loose reverse-path
# filtering (container bridges are asymmetric paths for rp_filter=1).
CONTAINER_SYSCTL: dict[str, int] = {
    "net.ipv4.ip_forward": 1,
    "net.ipv6.conf.all.forwarding": 1,
    "net.ipv4.conf.all.rp_filter": 2,
    "net.ipv4.conf.default.rp_filter": 2,
}
KERNEL_PREFIXES = ("kernel.", "fs.", "vm.", "dev.", "user.")  # not per network namespace

# --- OS: per package family ---------------------------------------------------------------

# Legacy cleartext services and their clients: telnet, rsh, NIS, TFTP, inetd.
ABSENT_PACKAGES: dict[str, tuple[str, ...]] = {
    "apt": (
        "telnetd",
        "inetutils-telnetd",
        "telnet",
        "rsh-server",
        "rsh-redone-server",
        "rsh-client",
        "rsh-redone-client",
        "nis",
        "tftpd",
        "tftpd-hpa",
        "atftpd",
        "tftp",
        "tftp-hpa",
        "openbsd-inetd",
        "inetutils-inetd",
        "xinetd",
    ),
    "dnf": (
        "telnet-server",
        "telnet",
        "rsh-server",
        "rsh",
        "ypserv",
        "ypbind",
        "tftp-server",
        "tftp",
        "xinetd",
    ),
}


@dataclass(frozen=True)
class FileMode:
    path: str
    user: str
    group: str
    mode: str  # octal digits, as ``chmod`` takes them


# Files that must have strict owners and modes (CIS 6.1 / 5.1, dev-sec os-03..os-05, sshd-03).
STRICT_FILES: dict[str, tuple[FileMode, ...]] = {
    "apt": (
        FileMode("/etc/passwd", "root", "root", "644"),
        FileMode("/etc/group", "root", "root", "644"),
        FileMode("/etc/shadow", "root", "shadow", "640"),
        FileMode("/etc/gshadow", "root", "shadow", "640"),
        FileMode("/etc/ssh/sshd_config", "root", "root", "600"),
    ),
    "dnf": (
        FileMode("/etc/passwd", "root", "root", "644"),
        FileMode("/etc/group", "root", "root", "644"),
        FileMode("/etc/shadow", "root", "root", "000"),
        FileMode("/etc/gshadow", "root", "root", "000"),
        FileMode("/etc/ssh/sshd_config", "root", "root", "600"),
    ),
}

# Firewalls that would fight gpunode's table (their own drop rules), stopped and disabled
# when present. Neither is active on a stock Debian/Ubuntu server; firewalld is on EL9.
CONFLICTING_FIREWALLS: dict[str, tuple[str, ...]] = {
    "apt": ("ufw.service", "firewalld.service"),
    "dnf": ("firewalld.service",),
}
SSHD_SERVICE: dict[str, str] = {"apt": "ssh", "dnf": "sshd"}


# --- config sections -------------------------------------------------------------------


class InputRule(Model):
    """One extra port open to some sources (besides SSH, inference, metrics, cluster)."""

    name: RuleName  # shows in the ruleset as a comment
    proto: Literal["tcp", "udp"] = "tcp"
    port: Port
    cidrs: list[Cidr] = Field(min_length=1)


class Firewall(Model):
    """gpunode's nftables table (roles/firewall.py).

    Input policy drop: allowed are established/related, loopback, rate-limited ICMP and the
    ICMPv6 that IPv6 needs, SSH (the connection's port) from network.admin_cidrs, the
    inference ports from network.app_cidrs, the metrics ports from network.monitoring_cidrs,
    the Nomad ports from network.cluster_cidrs, and extra_input.
    """

    # Off until an inventory turns it on: a drop-policy firewall needs admin_cidrs that
    # match how the controller reaches each node (checked at config load).
    enabled: bool = False
    # Load the config even when no admin CIDR covers the address this controller reaches
    # the host from (a NAT, a jump host): the anti-lockout rollback is then the only guard.
    force_admin_cidrs: bool = False
    extra_input: list[InputRule] = Field(default_factory=list)
    # The node runs containers (Docker, Podman, Nomad, Kubernetes): forwarding is on and
    # the forward chain lets container traffic out and lets published ports (DNAT) in from
    # the same CIDRs as the input chain; everything else forwarded is dropped. False: the
    # node routes nothing (forward policy drop, no exceptions).
    containers: bool = False
    container_interfaces: list[IfName] = Field(
        default_factory=lambda: ["docker0", "br-*", "cni*", "nomad", "podman*"]
    )
    icmp_rate: Rate = "10/second"  # echo requests (IPv4 and IPv6) above it are dropped
    log_drops: bool = True  # log dropped packets ("gpunode-drop" prefix in the kernel log)
    log_rate: Rate = "5/minute"  # at most this many drop log lines
    # Seconds after applying a new ruleset before the node restores the previous one by
    # itself, unless a NEW SSH connection from the controller confirmed it in time.
    rollback_seconds: Annotated[int, Field(ge=20, le=600)] = 60

    @field_validator("extra_input")
    @classmethod
    def _unique_names(cls, rules: list[InputRule]) -> list[InputRule]:
        names = [r.name for r in rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"rule name listed twice: {', '.join(dupes)} (allowed: each once)")
        return rules


class Ssh(Model):
    """sshd options users may change; the rest are fixed (SSHD_FIXED)."""

    # None: "prohibit-password" (key only) when gpunode itself connects as root, else "no"
    permit_root_login: Literal["no", "prohibit-password"] | None = None
    max_auth_tries: Annotated[int, Field(ge=1, le=6)] = 2  # dev-sec 2 (CIS: 4 or less)
    login_grace_time: Annotated[int, Field(ge=5, le=60)] = 30  # seconds (CIS: 60 or less)
    client_alive_interval: Annotated[int, Field(ge=1, le=900)] = 300  # seconds
    client_alive_count_max: Annotated[int, Field(ge=1, le=10)] = 3
    max_sessions: Annotated[int, Field(ge=1, le=64)] = 10
    max_startups: Annotated[str, StringConstraints(pattern=r"^[0-9]+(:[0-9]+:[0-9]+)?$")] = (
        "10:30:60"
    )
    ciphers: list[SshAlgorithm] = Field(default_factory=lambda: list(SSH_CIPHERS), min_length=1)
    kex_algorithms: list[SshAlgorithm] = Field(default_factory=lambda: list(SSH_KEX), min_length=1)
    macs: list[SshAlgorithm] = Field(default_factory=lambda: list(SSH_MACS), min_length=1)


class Hardening(Model):
    """sshd, sysctl and OS hardening (roles/hardening.py)."""

    enabled: bool = True  # False: the hardening role does nothing
    ssh: Ssh = Field(default_factory=Ssh)
    # sysctl keys over the defaults (SYSCTL_NETWORK, SYSCTL_KERNEL): a value sets or adds
    # the key, null drops one of the defaults
    sysctl: dict[SysctlKey, SysctlValue | None] = Field(default_factory=dict)
    core_dumps: bool = False  # False: hard core limit 0, systemd-coredump stores nothing
    remove_insecure_packages: bool = True  # ABSENT_PACKAGES: telnet, rsh, NIS, TFTP, inetd
    strict_file_modes: bool = True  # STRICT_FILES: /etc/shadow, sshd_config, ...


# --- what the roles render ------------------------------------------------------------


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
    from gpunode import inference, monitoring, nomad

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


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader([TEMPLATES / "firewall", TEMPLATES / "hardening"]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # noqa: S701 - nftables and sshd text, not HTML
    )


def render_ruleset(config: NodeConfig, ssh_port: int) -> str:
    """The nft script that atomically replaces gpunode's table (and touches nothing else)."""
    fw = config.firewall
    return (
        _environment()
        .get_template("gpunode.nft.j2")
        .render(
            table=NFT_TABLE,
            fw=fw,
            rules=allow_rules(config, ssh_port),
            published=[r for r in allow_rules(config, ssh_port) if r.name != "ssh"],
        )
    )


def root_login(config: NodeConfig, connection_user: str) -> str:
    chosen = config.hardening.ssh.permit_root_login
    if chosen is None:
        return "prohibit-password" if connection_user == "root" else "no"
    return chosen


def sshd_options(config: NodeConfig, connection_user: str) -> dict[str, str]:
    """Every option of the sshd drop-in, as ``sshd -T`` prints it (lowercase names)."""
    ssh = config.hardening.ssh
    return {
        **SSHD_FIXED,
        "permitrootlogin": root_login(config, connection_user),
        "maxauthtries": str(ssh.max_auth_tries),
        "logingracetime": str(ssh.login_grace_time),
        "clientaliveinterval": str(ssh.client_alive_interval),
        "clientalivecountmax": str(ssh.client_alive_count_max),
        "maxsessions": str(ssh.max_sessions),
        "maxstartups": ssh.max_startups,
        "ciphers": ",".join(ssh.ciphers),
        "kexalgorithms": ",".join(ssh.kex_algorithms),
        "macs": ",".join(ssh.macs),
    }


# sshd_config spells its keywords in CamelCase; sshd -T prints them lowercase.
SSHD_KEYWORDS = {
    k.lower(): k
    for k in (
        "PasswordAuthentication KbdInteractiveAuthentication PermitEmptyPasswords "
        "PubkeyAuthentication HostbasedAuthentication IgnoreRhosts AllowTcpForwarding "
        "AllowAgentForwarding AllowStreamLocalForwarding X11Forwarding PermitTunnel GatewayPorts "
        "PermitUserEnvironment StrictModes UseDNS Compression PrintLastLog LogLevel "
        "PermitRootLogin MaxAuthTries LoginGraceTime ClientAliveInterval ClientAliveCountMax "
        "MaxSessions MaxStartups Ciphers KexAlgorithms MACs"
    ).split()
}


def render_sshd(config: NodeConfig, connection_user: str) -> str:
    options = sshd_options(config, connection_user)
    return (
        _environment()
        .get_template("sshd.conf.j2")
        .render(options=[(SSHD_KEYWORDS[k], v) for k, v in options.items()])
    )


def sysctl_settings(config: NodeConfig) -> dict[str, int]:
    """All sysctl keys gpunode sets, defaults < container exceptions < hardening.sysctl."""
    values: dict[str, int | None] = {**SYSCTL_NETWORK, **SYSCTL_KERNEL}
    if config.firewall.enabled and config.firewall.containers:
        values.update(CONTAINER_SYSCTL)
    values.update(config.hardening.sysctl)
    return {k: v for k, v in values.items() if v is not None}


def is_kernel_key(key: str) -> bool:
    """Keys outside the network namespace (read-only in a container)."""
    return key.startswith(KERNEL_PREFIXES)


def render_sysctl(config: NodeConfig) -> str:
    return (
        _environment()
        .get_template("sysctl.conf.j2")
        .render(values=sorted(sysctl_settings(config).items()))
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
    if config.hardening.enabled and connection.user == "root":
        if config.hardening.ssh.permit_root_login == "no":
            problems.append(
                f"{where}: hardening.ssh.permit_root_login: 'no' but gpunode connects as root "
                "(connection.user), so the run would lock itself out (allowed: prohibit-password, "
                "or connect as an admin user with sudo)"
            )
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
