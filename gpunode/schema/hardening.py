"""``hardening:``: sshd, sysctl and OS controls (roles/hardening.py), with every default
table: the sshd algorithms and fixed options, the sysctl keys, the packages that must be
absent and the files with strict modes. tests/host/test_hardening.py checks them.

Reference level: dev-sec's ssh-baseline and linux-baseline and the CIS benchmarks for
Debian 12 / Ubuntu 24.04. Where they disagree the choice and the reason are next to the
value (and in docs/hardening.md).

.. code:: yaml

    hardening:
      ssh: {permit_root_login: prohibit-password}
      sysctl: {net.ipv4.tcp_timestamps: 0}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator, model_validator

from gpunode.schema.types import (
    AbsPath,
    ControllerPath,
    GroupName,
    HostOrAddress,
    KernelModule,
    Model,
    Port,
    SshAlgorithm,
    SysctlKey,
    SysctlValue,
    listed_twice,
)
from gpunode.schema.vault import SECRETS_DIR

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
# in the Ssh model below (forwarding, compression, TCP keep-alives, limits, algorithms) and
# are added by sshd_options().
SSHD_FIXED: dict[str, str] = {
    "passwordauthentication": "no",
    "kbdinteractiveauthentication": "no",
    "permitemptypasswords": "no",
    "pubkeyauthentication": "yes",
    "hostbasedauthentication": "no",
    "ignorerhosts": "yes",
    "allowstreamlocalforwarding": "no",
    "x11forwarding": "no",
    "permittunnel": "no",
    "gatewayports": "no",
    "permituserenvironment": "no",
    "strictmodes": "yes",
    "usedns": "no",
    "printlastlog": "yes",
    "loglevel": "VERBOSE",
}

# The login banner (CIS Debian 12, 1.7: no OS or version in it), on /etc/issue (the
# console), /etc/issue.net and sshd's Banner; hardening.banner changes it.
DEFAULT_BANNER = ("Authorized uses only. All activity may be monitored and reported.",)

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


# --- kernel modules ---------------------------------------------------------------------------

# Kernel modules an inference node does not need, turned off (hardening.allow_modules lets one
# back): /etc/modprobe.d/60-gpunode-modules.conf says `install <module> /bin/false` (an
# explicit load fails) and `blacklist <module>` (no alias loads it). module -> why.
# Not here on purpose: squashfs (Ubuntu's snaps), vfat (the EFI system partition), overlay
# (container runtimes), and anything a GPU needs.
DISABLED_MODULES: dict[str, str] = {
    "dccp": "uncommon network protocol (CIS Debian 12, 3.2 network kernel modules)",
    "sctp": "uncommon network protocol (CIS Debian 12, 3.2 network kernel modules)",
    "rds": "uncommon network protocol (CIS Debian 12, 3.2 network kernel modules)",
    "tipc": "uncommon network protocol (CIS Debian 12, 3.2 network kernel modules)",
    "cramfs": "uncommon filesystem (CIS Debian 12, 1.1.1 filesystem kernel modules)",
    "freevxfs": "uncommon filesystem (CIS Debian 12, 1.1.1 filesystem kernel modules)",
    "jffs2": "uncommon filesystem (CIS Debian 12, 1.1.1 filesystem kernel modules)",
    "hfs": "uncommon filesystem (CIS Debian 12, 1.1.1 filesystem kernel modules)",
    "hfsplus": "uncommon filesystem (CIS Debian 12, 1.1.1 filesystem kernel modules)",
    "udf": "uncommon filesystem (CIS Debian 12, 1.1.1 filesystem kernel modules)",
    "usb-storage": "removable storage (CIS Debian 12, 1.1.1 filesystem kernel modules)",
    "firewire-core": "FireWire: DMA from an external device (dev-sec linux baseline)",
}


# --- after upgrades: restarts and package verification --------------------------------------

# needrestart (Debian/Ubuntu; EL9: from EPEL, which also needs CRB) restarts the daemons still
# running old libraries after a package upgrade (unattended ones too: its apt/dnf hook), with
# templates/hardening/needrestart.conf: automatically, except the units gpunode restarts itself
# under a health gate (`gpunode rollout`): those it lists only. unit regex -> why.
NEEDRESTART_LIST_ONLY: dict[str, str] = {
    r"^gpunode-inference-.+\.service$": "inference services: restarted by gpunode rollout, "
    "canary first, behind a health check",
    r"^haproxy\.service$": "the gateway: a restart drops its open connections",
}
RESTART_PACKAGES: dict[str, tuple[str, ...]] = {"apt": ("needrestart",), "dnf": ("needrestart",)}

# Package verification, run by gpunode-package-verify.timer: the checksums of every installed
# package's files against the package database (configuration files left out: gpunode and the
# admins change those). Exit status not 0 -> the unit fails, the changed files in its journal.
# family -> (package to install, command).
PACKAGE_VERIFY: dict[str, tuple[str, str]] = {
    "apt": ("debsums", "/usr/bin/debsums --silent"),  # CIS Debian 12 1.3 (software integrity)
    "dnf": ("rpm", "/usr/bin/rpm --verify --all --noconfig --nomtime"),
}


# --- audit trail (auditd) ------------------------------------------------------------------------

# Watched paths (writes and attribute changes), path -> key (`ausearch -k KEY`); a deeper path
# is listed before the one above it (the kernel takes the first rule that matches). Each
# secret's own `dest` is watched as gpunode-secrets too. CIS Debian 12 6.2.3 (auditd rules).
AUDIT_WATCHES: dict[str, str] = {
    SECRETS_DIR: "gpunode-secrets",
    "/etc/gpunode": "gpunode",  # the firewall ruleset, provenance, AIDE's settings
    "/var/lib/gpunode": "gpunode",  # the seal, artifacts, services' state
    "/etc/systemd/system": "units",
    "/etc/passwd": "identity",
    "/etc/group": "identity",
    "/etc/shadow": "identity",
    "/etc/gshadow": "identity",
    "/etc/sudoers": "sudoers",
    "/etc/sudoers.d": "sudoers",
    "/etc/ssh/sshd_config": "sshd",
    "/etc/ssh/sshd_config.d": "sshd",
    "/etc/modprobe.d": "modules",
    "/etc/localtime": "time-change",
}
# System calls, key -> names, recorded for 64- and 32-bit callers.
AUDIT_SYSCALLS: dict[str, tuple[str, ...]] = {
    "modules": ("init_module", "finit_module", "delete_module"),
    "time-change": ("adjtimex", "settimeofday", "clock_settime"),
}
# Every program run as root by someone who logged in (sudo, su, ...): euid 0 and a login uid.
AUDIT_ROOT_COMMANDS_KEY = "root-commands"
# The kernel's command line for auditing from boot on. The kernel gives a process an audit
# context when it is forked, and only once auditing has ever been on: without `audit=1`,
# systemd (PID 1: `systemctl enable` links units in its name) and everything it starts before
# auditd are never audited until they restart (CIS Debian 12 6.2.1.3); and room for the events
# of boot until auditd reads them (6.2.1.4: at least 8192).
AUDIT_BOOT_ARGS: tuple[str, ...] = ("audit=1", "audit_backlog_limit=8192")
# family -> how they reach the next boots: "update-grub" (a drop-in in /etc/default/grub.d,
# which Debian's and Ubuntu's grub-mkconfig read after /etc/default/grub); None: gpunode does
# not set them there, and a notice says how (EL9's BLS entries: grubby).
AUDIT_BOOT_LOADER: dict[str, str | None] = {"apt": "update-grub", "dnf": None}
AUDIT_BOOT_BY_HAND: dict[str, str] = {
    "apt": "add them where this host's boot loader sets the kernel's command line",
    "dnf": "grubby --update-kernel=ALL --args='{args}'",
}
# family -> package, group that may read the log
AUDIT_PACKAGE: dict[str, str] = {"apt": "auditd", "dnf": "audit"}
AUDIT_LOG_GROUP: dict[str, str] = {"apt": "adm", "dnf": "root"}

# --- logins: login.defs, PAM ---------------------------------------------------------------------

# /etc/login.defs keys gpunode sets, from hardening.login (CIS Debian 12 5.4.1 password aging,
# 5.4.3.3 umask, dev-sec os-05). `passwd` and `chpasswd` hash through PAM's pam_unix, already
# yescrypt (Debian 12, Ubuntu) or sha512 (EL9) as shipped; ENCRYPT_METHOD is for the tools that
# hash by themselves (`chpasswd -c`, newusers): SHA512, which every supported shadow knows, with
# hardening.login.hash_rounds rounds.
LOGIN_DEFS_HASH = "SHA512"
# A private TMPDIR per login (/tmp/user/<uid>): family -> package; None: not packaged there
# (EL9 polyinstantiates /tmp with pam_namespace instead, which gpunode does not configure).
PAM_TMPDIR_PACKAGE: dict[str, str | None] = {"apt": "libpam-tmpdir", "dnf": None}

# --- file integrity (AIDE) ---------------------------------------------------------------------

# AIDE's database (/var/lib/gpunode/aide/) keeps, for each file under these paths, what the rule
# names; gpunode-file-integrity.timer compares. Package files are also checked against the
# package database (PACKAGE_VERIFY); AIDE adds configuration and what no package owns.
AIDE_RULES: dict[str, str] = {
    # mode, owner, group, link target, digest (a directory's size and link count change when
    # an entry comes and goes, which AIDE reports as added or removed entries already)
    "CONTENT": "p+u+g+l+sha256",
    "PERMS": "p+u+g+l",  # no digest: the secrets' content never enters the database
}
# path -> rule (a more specific path's rule wins)
AIDE_WATCH: dict[str, str] = {
    "/usr/bin": "CONTENT",
    "/usr/sbin": "CONTENT",
    "/usr/local": "CONTENT",  # gpunode-probe, gpunode-seal, whatever was installed by hand
    "/etc": "CONTENT",  # configuration: sshd, sudoers, units, the firewall ruleset, provenance
    "/root/.ssh": "CONTENT",
    "/opt/gpunode": "CONTENT",  # the pip runtimes' virtual environments
    "/var/lib/gpunode/runtimes": "CONTENT",  # runtime artifacts (llama-server, ...)
    SECRETS_DIR: "PERMS",  # and each secret's own `dest`
}
# rewritten by the system itself, not by anyone's hand
AIDE_IGNORE: tuple[str, ...] = ("/etc/adjtime", "/etc/ld.so.cache", "/etc/.pwd.lock")
# family -> the aide binary; distro -> the key of the database to read (AIDE 0.17 renamed it)
AIDE_BINARY: dict[str, str] = {"apt": "/usr/bin/aide", "dnf": "/usr/sbin/aide"}
# family -> the unit that installs the automatic upgrades `base.auto_updates` turns on, and the
# package database every install rewrites: once that unit ran and the package database is newer
# than AIDE's, AIDE takes the upgrades' changes in (each written to the journal), as a deploy does
AUTO_UPGRADE_SERVICE: dict[str, str] = {
    "apt": "apt-daily-upgrade.service",  # APT::Periodic::Unattended-Upgrade: unattended-upgrade
    "dnf": "dnf-automatic.service",  # dnf-automatic.timer's
}
PACKAGE_DATABASE: dict[str, str] = {
    "apt": "/var/lib/dpkg/status",
    "dnf": "/var/lib/rpm/rpmdb.sqlite",
}
AIDE_DATABASE_KEY: dict[str, str] = {
    "debian12": "database_in",  # AIDE 0.18
    "ubuntu2204": "database_in",  # 0.17
    "ubuntu2404": "database_in",  # 0.18
    "rhel9": "database",  # 0.16
    "rocky9": "database",
    "alma9": "database",
}


# --- remote logs (rsyslog over TLS) -----------------------------------------------------------

# hardening.remote_logs: rsyslog forwards every message it gets from the journal to a central log
# host over TLS (RFC 5425, syslog over TLS: port 6514, octet-counted RFC 5424 messages), through a
# disk-assisted queue. CIS Debian 12, logging: "Ensure rsyslog is configured to send logs to a
# remote log host" (and the journald items' remote part). family -> packages (Debian/Ubuntu:
# logrotate is only rsyslog's Recommends, and without it /var/log/syslog grows without bound;
# EL9's rsyslog requires it).
REMOTE_LOGS_PACKAGES: dict[str, tuple[str, ...]] = {
    "apt": ("rsyslog", "rsyslog-gnutls", "logrotate"),
    "dnf": ("rsyslog", "rsyslog-gnutls"),
}
# rsyslog's work directory as the distro's /etc/rsyslog.conf sets it (Debian/Ubuntu
# `$WorkDirectory`, EL9 `global(workDirectory=...)`): the queue's disk part is kept there.
RSYSLOG_WORK_DIR: dict[str, str] = {"apt": "/var/spool/rsyslog", "dnf": "/var/lib/rsyslog"}
# How the journal reaches rsyslog, per family. "forward": journald passes every message to
# /run/systemd/journal/syslog (ForwardToSyslog=yes: Debian's and Ubuntu's default, which gpunode
# also writes in a journald drop-in) and rsyslog's imuxsock, loaded by their /etc/rsyslog.conf,
# reads it. "imjournal": EL9's /etc/rsyslog.conf loads imjournal, which reads the journal itself
# (journald's ForwardToSyslog stays at EL9's "no", or every message would arrive twice).
JOURNAL_TO_RSYSLOG: dict[str, Literal["forward", "imjournal"]] = {
    "apt": "forward",
    "dnf": "imjournal",
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


class Ssh(Model):
    """sshd options users may change; the rest are fixed (SSHD_FIXED)."""

    permit_root_login: Literal["no", "prohibit-password"] | None = None
    """`PermitRootLogin`. null: "prohibit-password" (key only) when gpunode itself connects as
    root, else "no"; "no" while gpunode connects as root is refused (it would lock itself
    out)."""
    max_auth_tries: Annotated[int, Field(ge=1, le=6)] = 2
    """`MaxAuthTries`: dev-sec 2 (CIS: 4 or less)."""
    login_grace_time: Annotated[int, Field(ge=5, le=60)] = 30
    """`LoginGraceTime`, in seconds (CIS: 60 or less)."""
    client_alive_interval: Annotated[int, Field(ge=1, le=900)] = 300
    """`ClientAliveInterval`: seconds between keep-alive probes to a silent client."""
    client_alive_count_max: Annotated[int, Field(ge=1, le=10)] = 3
    """`ClientAliveCountMax`: unanswered keep-alive probes before sshd drops the client."""
    max_sessions: Annotated[int, Field(ge=1, le=64)] = 10
    """`MaxSessions`: sessions per connection."""
    max_startups: Annotated[str, StringConstraints(pattern=r"^[0-9]+(:[0-9]+:[0-9]+)?$")] = (
        "10:30:60"
    )
    """`MaxStartups`: unauthenticated connections, start:rate:full (from start on, rate %
    of new ones are refused, rising to all at full) or one number."""
    ciphers: list[SshAlgorithm] = Field(default_factory=lambda: list(SSH_CIPHERS), min_length=1)
    """`Ciphers`, at least one (see SSH_CIPHERS; a name the node's sshd does not know makes
    the role refuse the config)."""
    kex_algorithms: list[SshAlgorithm] = Field(default_factory=lambda: list(SSH_KEX), min_length=1)
    """`KexAlgorithms`, at least one (see SSH_KEX)."""
    macs: list[SshAlgorithm] = Field(default_factory=lambda: list(SSH_MACS), min_length=1)
    """`MACs`, at least one (see SSH_MACS)."""
    allow_tcp_forwarding: bool = False
    """`AllowTcpForwarding` (CIS Debian 12 5.1.4, dev-sec sshd-25): port forwarding through
    the node; true for admins who tunnel to a service on loopback."""
    allow_agent_forwarding: bool = False
    """`AllowAgentForwarding` (dev-sec sshd-26): a forwarded agent on the node can be used by
    anyone who is root there."""
    compression: bool = False
    """`Compression` (dev-sec sshd-21)."""
    tcp_keepalive: bool = False
    """`TCPKeepAlive` (dev-sec sshd-13): false, ClientAlive* probes (inside the encrypted
    channel, not spoofable) drop dead sessions instead."""
    allow_groups: list[GroupName] = Field(default_factory=list)
    """`AllowGroups`: groups allowed to log in over SSH besides those always allowed:
    `base.admin_group`, the primary group of the user gpunode connects as (`root` for
    root) and the own group of each `base.admin_users` entry with `sudo: false` (useradd
    gives each user a group of its name). Everyone else is refused by sshd."""


class Sudo(Model):
    """sudo's defaults (a sudoers drop-in checked with `visudo` before it takes effect)."""

    use_pty: bool = True
    """`Defaults use_pty`: commands run in a pseudo-terminal of their own, so a command
    left in the background cannot read or inject into the admin's terminal (CIS 5.3.2);
    false: the distro's default."""
    logfile: AbsPath | None = "/var/log/sudo.log"
    """`Defaults logfile=`: every sudo command (who, where, as whom, what) is also written
    to this file (CIS 5.3.3), besides syslog/the journal; null: syslog only."""


class Audit(Model):
    """auditd with gpunode's rules (AUDIT_WATCHES, AUDIT_SYSCALLS, root commands)."""

    enabled: bool = True
    """false: gpunode installs no auditd and removes its rules."""
    immutable: bool = False
    """`-e 2`: the loaded rules cannot be changed until the next boot (CIS 6.2.3.20); a
    deploy that changes them then fails with the reason until the node reboots."""
    max_log_file_mb: Annotated[int, Field(ge=1, le=1024)] = 50
    """`max_log_file`: size of one audit log, in MiB."""
    num_logs: Annotated[int, Field(ge=2, le=99)] = 8
    """`num_logs`: logs kept (the oldest goes): at most num_logs x max_log_file_mb on disk."""
    boot_args: bool = True
    """AUDIT_BOOT_ARGS (`audit=1 audit_backlog_limit=8192`) on the kernel's command line,
    through the boot loader (AUDIT_BOOT_LOADER): processes started before auditd, systemd
    itself among them, are audited too (CIS Debian 12 6.2.1.3, 6.2.1.4). They take effect at
    the next boot; until then every run says so. Where gpunode does not manage the boot loader
    (EL9, a host without update-grub) a notice says how to add them. false: gpunode's GRUB
    drop-in is removed."""


class Login(Model):
    """Local logins: the default umask, password aging and hashing, a private TMPDIR."""

    umask: Literal["022", "027", "077"] = "027"
    """`UMASK` in /etc/login.defs (new home directories, and sessions where pam_umask reads
    it: Ubuntu's stock PAM) and `umask` in /etc/profile.d for login shells (CIS Debian 12
    5.4.3.3): files a user makes are not readable by others. gpunode's own operations do not
    depend on it: whatever it installs for other users gets explicit modes."""
    password_max_days: Annotated[int, Field(ge=1, le=99999)] = 365
    """`PASS_MAX_DAYS` (CIS 5.4.1.1), and `chage -M` on every local account that has a
    password, except the account gpunode connects as (an expired password would refuse its
    SSH key too): that one gets a notice."""
    password_min_days: Annotated[int, Field(ge=0, le=365)] = 1
    """`PASS_MIN_DAYS` (CIS 5.4.1.2), and `chage -m` on accounts with a password."""
    password_warn_days: Annotated[int, Field(ge=0, le=90)] = 7
    """`PASS_WARN_AGE` (CIS 5.4.1.3), and `chage -W` on accounts with a password."""
    hash_rounds: Annotated[int, Field(ge=5000, le=1_000_000)] = 65536
    """`SHA_CRYPT_MIN_ROUNDS` and `SHA_CRYPT_MAX_ROUNDS`, with `ENCRYPT_METHOD SHA512`
    (LOGIN_DEFS_HASH), for the tools that hash by themselves (PAM's pam_unix hashes
    `passwd`'s: yescrypt or sha512 as the distro ships it)."""
    private_tmp: bool = True
    """pam_tmpdir (PAM_TMPDIR_PACKAGE): each login gets its own TMPDIR, /tmp/user/<uid>
    (mode 700); where it is not packaged (EL9) a notice says so."""

    @model_validator(mode="after")
    def _aging(self) -> Login:
        if self.password_min_days > self.password_max_days:
            raise ValueError(
                f"password_min_days ({self.password_min_days}) is above password_max_days "
                f"({self.password_max_days}) (allowed: min <= max)"
            )
        if self.password_warn_days >= self.password_max_days:
            raise ValueError(
                f"password_warn_days ({self.password_warn_days}) is not below "
                f"password_max_days ({self.password_max_days}) (allowed: warn < max)"
            )
        return self


class RemoteLogs(Model):
    """The central log host the journal is forwarded to (rsyslog, TLS)."""

    host: HostOrAddress
    """The log host: a DNS name or an IP address. rsyslog connects to it and accepts only a
    certificate for this name, signed by `ca_file` (`StreamDriverAuthMode="x509/name"`); the
    name is matched against the certificate's DNS names and CN (an IP address too: the
    rsyslog of the supported distros does not read a certificate's IP address entries)."""
    port: Port = 6514
    """The log host's syslog-over-TLS port (RFC 5425: 6514)."""
    ca_file: ControllerPath
    """The CA certificate (PEM) that signs the log host's certificate: a file on the machine
    that runs the deploy (a drift controller too: list it in `monitoring.drift.credentials`),
    read when the deploy starts and refused, before any host is touched, unless it holds only
    CA certificates (basicConstraints CA:TRUE, valid now). Only this CA is trusted for the log
    host, not the system's bundle. Written to the node as
    /etc/rsyslog.d/gpunode-remote-logs-ca.pem."""
    queue_max_mb: Annotated[int, Field(ge=16, le=16384)] = 256
    """The most disk space, in MiB, the messages waiting for the log host take (rsyslog's
    disk-assisted queue, kept across restarts): while the log host is unreachable nothing is
    lost up to this bound; beyond it new messages are not forwarded (they stay in the local
    journal) and the disk never fills."""


class Hardening(Model):
    """sshd, sysctl and OS hardening (roles/hardening.py)."""

    enabled: bool = True
    """false: the hardening role does nothing."""
    ssh: Ssh = Field(default_factory=Ssh)
    """sshd options users may change; the rest are fixed (SSHD_FIXED)."""
    sudo: Sudo = Field(default_factory=Sudo)
    """A pseudo-terminal per command and a log file."""
    sysctl: dict[SysctlKey, SysctlValue | None] = Field(default_factory=dict)
    """sysctl keys over the defaults (SYSCTL_NETWORK, SYSCTL_KERNEL): a value sets or adds
    the key, null drops one of the defaults."""
    core_dumps: bool = False
    """false: hard core limit 0, systemd-coredump stores nothing."""
    remove_insecure_packages: bool = True
    """Remove ABSENT_PACKAGES: telnet, rsh, NIS, TFTP, inetd."""
    strict_file_modes: bool = True
    """Enforce owners and modes of STRICT_FILES: /etc/shadow, sshd_config, ..."""
    banner: list[Annotated[str, StringConstraints(max_length=200)]] | None = Field(
        default_factory=lambda: list(DEFAULT_BANNER), max_length=40
    )
    """The login banner's lines, on /etc/issue, /etc/issue.net and sshd's `Banner`; null:
    leave the distro's files and sshd without a banner."""
    audit: Audit = Field(default_factory=Audit)
    """The audit trail: auditd, its rules, its logs' size."""
    login: Login = Field(default_factory=Login)
    """Local logins: umask, password aging and hashing (login.defs, chage), pam_tmpdir."""
    file_integrity: Literal["hourly", "daily", "weekly"] | None = "daily"
    """How often gpunode-file-integrity.timer has AIDE compare the files of AIDE_WATCH with
    its database (a deploy that changes them updates it); null: AIDE not configured (its
    settings and units removed)."""
    restart_services: bool = True
    """needrestart after every package upgrade: daemons still running old libraries restarted
    automatically, except those of NEEDRESTART_LIST_ONLY (listed only); false: needrestart is
    not installed or configured by gpunode."""
    verify_packages: Literal["daily", "weekly", "monthly"] | None = "weekly"
    """How often gpunode-package-verify.timer checks every package's files against the
    package database (PACKAGE_VERIFY: debsums, rpm --verify); null: never."""
    allow_modules: list[KernelModule] = Field(default_factory=list)
    """Kernel modules of DISABLED_MODULES this node needs (e.g. [sctp]): left loadable."""
    disable_modules: list[KernelModule] = Field(default_factory=list)
    """Kernel modules turned off besides DISABLED_MODULES."""
    remote_logs: RemoteLogs | None = None
    """Forward the journal to a central log host over TLS (rsyslog); null: nothing forwarded
    (gpunode's forwarding settings are removed; rsyslog stays installed)."""

    @field_validator("allow_modules")
    @classmethod
    def _allowed(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in DISABLED_MODULES:
                raise ValueError(
                    f"{name!r} is not a module gpunode turns off (allowed: "
                    f"{', '.join(DISABLED_MODULES)})"
                )
        if listed_twice(value):
            raise ValueError("a module is listed twice (allowed: each once)")
        return value

    @field_validator("disable_modules")
    @classmethod
    def _disabled(cls, value: list[str]) -> list[str]:
        for name in value:
            if name in DISABLED_MODULES:
                raise ValueError(f"{name!r} is turned off already (allowed: another module)")
        if listed_twice(value):
            raise ValueError("a module is listed twice (allowed: each once)")
        return value
