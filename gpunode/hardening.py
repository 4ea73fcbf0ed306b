"""sshd and sysctl hardening rendered from a node's config (roles/hardening.py applies it).

Every default and table is in gpunode/schema/hardening.py.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from pyinfra.api.exceptions import PyinfraError

from gpunode.render import environment, rainerscript_string, sudoers_value
from gpunode.schema.hardening import (
    AIDE_BINARY,
    AIDE_DATABASE_KEY,
    AIDE_IGNORE,
    AIDE_RULES,
    AIDE_WATCH,
    AUDIT_BOOT_ARGS,
    AUDIT_LOG_GROUP,
    AUDIT_ROOT_COMMANDS_KEY,
    AUDIT_SYSCALLS,
    AUDIT_WATCHES,
    AUTO_UPGRADE_SERVICE,
    CONTAINER_SYSCTL,
    DISABLED_MODULES,
    LOGIN_DEFS_HASH,
    NEEDRESTART_LIST_ONLY,
    PACKAGE_DATABASE,
    PACKAGE_VERIFY,
    REMOTE_LOGS_PACKAGES,
    RESTART_PACKAGES,
    RSYSLOG_WORK_DIR,
    SSHD_FIXED,
    SYSCTL_KERNEL,
    SYSCTL_NETWORK,
)
from gpunode.schema.node import Connection, NodeConfig
from gpunode.schema.types import GROUPNAME_RE, USERNAME_RE

SSHD_DROPIN = "/etc/ssh/sshd_config.d/00-gpunode.conf"  # first match wins: sorts first
SSHD_STAGED = "/etc/gpunode/sshd/00-gpunode.conf"  # validated here before it goes live
SUDO_DROPIN = "/etc/sudoers.d/99-gpunode-hardening"  # read last: its Defaults win
SYSCTL_FILE = "/etc/sysctl.d/60-gpunode-hardening.conf"
ISSUE_FILE, ISSUE_NET_FILE = "/etc/issue", "/etc/issue.net"
MODPROBE_FILE = "/etc/modprobe.d/60-gpunode-modules.conf"
CORE_LIMITS_FILE = "/etc/security/limits.d/60-gpunode-core.conf"
COREDUMP_DROPIN = "/etc/systemd/coredump.conf.d/60-gpunode.conf"
NEEDRESTART_FILE = "/etc/needrestart/conf.d/60-gpunode.conf"  # read after needrestart.conf
AUDITD_CONF = "/etc/audit/auditd.conf"
AUDIT_RULES = "/etc/audit/rules.d/60-gpunode.rules"
AUDIT_IMMUTABLE_RULES = "/etc/audit/rules.d/99-gpunode-immutable.rules"  # -e 2 comes last
# read by Debian's and Ubuntu's grub-mkconfig after /etc/default/grub (and the cloud images'
# 50-*.cfg): it adds to GRUB_CMDLINE_LINUX, the arguments of every entry, recovery included
AUDIT_GRUB_DROPIN = "/etc/default/grub.d/60-gpunode-audit.cfg"
GRUB_CFG = "/boot/grub/grub.cfg"  # what update-grub writes and GRUB reads at boot
AIDE_CONF = "/etc/gpunode/aide.conf"
AIDE_DIR = "/var/lib/gpunode/aide"
LOGIN_DEFS = "/etc/login.defs"
PROFILE_UMASK = "/etc/profile.d/60-gpunode-umask.sh"  # login shells, after the distro's
AIDE_DB, AIDE_DB_NEW = f"{AIDE_DIR}/aide.db.gz", f"{AIDE_DIR}/aide.db.new.gz"
INTEGRITY_SERVICE = "gpunode-file-integrity.service"
INTEGRITY_TIMER = "gpunode-file-integrity.timer"
# after the automatic upgrades (AUTO_UPGRADE_SERVICE): AIDE takes their changes in
INTEGRITY_UPDATE_SERVICE = "gpunode-file-integrity-update.service"
INTEGRITY_UPDATE_SCRIPT = "/usr/local/sbin/gpunode-file-integrity-update"
VERIFY_SERVICE = "gpunode-package-verify.service"
VERIFY_TIMER = "gpunode-package-verify.timer"
REMOTE_LOGS_CONF = "/etc/rsyslog.d/60-gpunode-remote.conf"
# beside the drop-in: Ubuntu 24.04's AppArmor profile of rsyslogd lets it read /etc/rsyslog.d/**
# (not /etc/gpunode); the include takes *.conf only, so the .pem is no configuration
REMOTE_LOGS_CA = "/etc/rsyslog.d/gpunode-remote-logs-ca.pem"
REMOTE_LOGS_JOURNALD = "/etc/systemd/journald.conf.d/60-gpunode-remote-logs.conf"
REMOTE_LOGS_QUEUE = "gpunode-remote-logs"  # the queue's file names in rsyslog's work directory
KERNEL_PREFIXES = ("kernel.", "fs.", "vm.", "dev.", "user.")  # not per network namespace
SSHD_SERVICE: dict[str, str] = {"apt": "ssh", "dnf": "sshd"}


def root_login(config: NodeConfig, connection_user: str) -> str:
    chosen = config.hardening.ssh.permit_root_login
    if chosen is None:
        return "prohibit-password" if connection_user == "root" else "no"
    return chosen


def _yes(value: bool) -> str:
    return "yes" if value else "no"


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
        "banner": ISSUE_NET_FILE if config.hardening.banner is not None else "none",
        "allowtcpforwarding": _yes(ssh.allow_tcp_forwarding),
        "allowagentforwarding": _yes(ssh.allow_agent_forwarding),
        "compression": _yes(ssh.compression),
        "tcpkeepalive": _yes(ssh.tcp_keepalive),
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
        "MaxSessions MaxStartups Ciphers KexAlgorithms MACs TCPKeepAlive Banner"
    ).split()
}


def allow_groups(config: NodeConfig, connection_group: str) -> list[str]:
    """sshd's AllowGroups: the admin group, the connection user's primary group (as the
    host reports it: ``connection_group``), the own group of each admin user without sudo,
    and ``hardening.ssh.allow_groups``; each once, in that order. A group name the host
    reports that is not a plain name (sshd would read ``*?!,`` as a pattern) is refused."""
    if not any(re.fullmatch(p, connection_group) for p in (GROUPNAME_RE, USERNAME_RE)):
        raise ValueError(
            f"the connection user's primary group {connection_group!r} is not a plain group "
            "name (allowed: letters, digits, '_' and '-')"
        )
    base = config.base
    groups = [
        base.admin_group,
        connection_group,
        *(u.name for u in base.admin_users if not u.sudo),
        *config.hardening.ssh.allow_groups,
    ]
    return list(dict.fromkeys(groups))


def render_sshd(config: NodeConfig, connection_user: str, connection_group: str) -> str:
    options = sshd_options(config, connection_user)
    return (
        environment("hardening")
        .get_template("sshd.conf.j2")
        .render(
            options=[(SSHD_KEYWORDS[k], v) for k, v in options.items()],
            allow_groups=allow_groups(config, connection_group),
        )
    )


def render_sudo_defaults(config: NodeConfig) -> str:
    """The sudoers drop-in with sudo's hardened defaults (every value quoted for sudoers)."""
    sudo = config.hardening.sudo
    return (
        environment("hardening")
        .get_template("sudoers.j2")
        .render(
            use_pty=sudo.use_pty,
            logfile=sudoers_value(sudo.logfile, "hardening.sudo.logfile") if sudo.logfile else None,
        )
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
        environment("hardening")
        .get_template("sysctl.conf.j2")
        .render(values=sorted(sysctl_settings(config).items()))
    )


def render_issue(config: NodeConfig, net: bool = False) -> str:
    """/etc/issue (``net``: /etc/issue.net) from hardening.banner. agetty reads backslash
    escapes in /etc/issue (``\\l``: the tty, ...), so a backslash there is doubled; sshd
    and /etc/issue.net print the text as it is."""
    lines = config.hardening.banner or []
    if not net:
        lines = [line.replace("\\", "\\\\") for line in lines]
    return "".join(f"{line}\n" for line in lines)


def disabled_modules(config: NodeConfig) -> list[str]:
    """The kernel modules turned off: DISABLED_MODULES but hardening.allow_modules, and
    hardening.disable_modules."""
    hard = config.hardening
    return [m for m in DISABLED_MODULES if m not in hard.allow_modules] + hard.disable_modules


def render_modprobe(config: NodeConfig) -> str:
    """/etc/modprobe.d/60-gpunode-modules.conf: for each module turned off, an explicit
    load runs /bin/false (and fails), and no alias loads it. Names are KernelModule (a-z,
    0-9, '_', '-'): one word each."""
    lines = [
        "# Kernel modules turned off by gpunode (gpunode/schema/hardening.py DISABLED_MODULES,",
        "# hardening.allow_modules, hardening.disable_modules). Written by gpunode.",
    ]
    for module in disabled_modules(config):
        lines += [f"install {module} /bin/false", f"blacklist {module}"]
    return "\n".join(lines) + "\n"


def login_defs(config: NodeConfig) -> dict[str, str]:
    """The /etc/login.defs keys gpunode sets, from hardening.login (LOGIN_DEFS_HASH)."""
    login = config.hardening.login
    return {
        "UMASK": login.umask,
        "PASS_MAX_DAYS": str(login.password_max_days),
        "PASS_MIN_DAYS": str(login.password_min_days),
        "PASS_WARN_AGE": str(login.password_warn_days),
        "ENCRYPT_METHOD": LOGIN_DEFS_HASH,
        "SHA_CRYPT_MIN_ROUNDS": str(login.hash_rounds),
        "SHA_CRYPT_MAX_ROUNDS": str(login.hash_rounds),
    }


def render_profile_umask(config: NodeConfig) -> str:
    """/etc/profile.d/60-gpunode-umask.sh: login shells' umask (read after /etc/profile's
    own, which on EL9 sets 002/022)."""
    return (
        "# The login shells' umask, from hardening.login.umask. Written by gpunode.\n"
        f"umask {config.hardening.login.umask}\n"
    )


def render_needrestart() -> str:
    """needrestart's drop-in: restart automatically, list only NEEDRESTART_LIST_ONLY."""
    return (
        environment("hardening")
        .get_template("needrestart.conf.j2")
        .render(list_only=list(NEEDRESTART_LIST_ONLY.items()))
    )


def restart_packages(family: str) -> list[str]:
    return list(RESTART_PACKAGES[family])


def verify_package(family: str) -> str:
    """The package that brings the verification command (PACKAGE_VERIFY)."""
    return PACKAGE_VERIFY[family][0]


def render_verify_units(config: NodeConfig, family: str) -> dict[str, str]:
    """gpunode-package-verify.service and .timer, by file name."""
    env = environment("hardening")
    return {
        VERIFY_SERVICE: env.get_template("package-verify.service.j2").render(
            command=PACKAGE_VERIFY[family][1]
        ),
        VERIFY_TIMER: env.get_template("package-verify.timer.j2").render(
            calendar=config.hardening.verify_packages
        ),
    }


_AIDE_PATH_RE = re.compile(r"/[A-Za-z0-9._+@:,=/-]*")


def aide_path(path: str) -> str:
    """A path as an AIDE selection line takes it: a regular expression, so every character
    that is not a letter, digit, '/', '_' or '-' is escaped. Paths are AbsPath (no spaces or
    control characters); anything else is refused."""
    if not _AIDE_PATH_RE.fullmatch(path) or "/../" in f"{path}/":
        raise ValueError(f"{path!r} is not a plain absolute path")
    return "".join(c if c.isalnum() or c in "/_-" else f"\\{c}" for c in path)


def aide_watch(config: NodeConfig) -> list[tuple[str, str]]:
    """(path, rule) for every watched path: AIDE_WATCH, and each secret file's own
    destination (owner and mode only: no digest of a secret in the database)."""
    watch = dict(AIDE_WATCH)
    for name, secret in config.secrets.items():
        watch.setdefault(secret.dest_for(name), "PERMS")
    return sorted(watch.items())


def render_aide(config: NodeConfig, distro: str, family: str) -> str:
    return (
        environment("hardening")
        .get_template("aide.conf.j2")
        .render(
            database_key=AIDE_DATABASE_KEY[distro],
            database=AIDE_DB,
            database_new=AIDE_DB_NEW,
            rules=list(AIDE_RULES.items()),
            # a secret file's path is the file only ("$"); AIDE_WATCH's are trees
            watch=[
                (aide_path(p) + ("" if p in AIDE_WATCH else "$"), rule)
                for p, rule in aide_watch(config)
            ],
            ignore=[aide_path(p) for p in AIDE_IGNORE],
        )
    )


def render_integrity_units(config: NodeConfig, family: str) -> dict[str, str]:
    """gpunode-file-integrity.service and .timer, by file name."""
    env = environment("hardening")
    return {
        INTEGRITY_SERVICE: env.get_template("file-integrity.service.j2").render(
            command=integrity_check_command(family)
        ),
        INTEGRITY_TIMER: env.get_template("file-integrity.timer.j2").render(
            calendar=config.hardening.file_integrity
        ),
    }


def audit_watches(config: NodeConfig) -> list[tuple[str, str]]:
    """(path, key) of every watched path, deeper paths first (the first matching rule's key
    is the event's): AUDIT_WATCHES and each secret file's own destination."""
    watches = dict(AUDIT_WATCHES)
    for name, secret in config.secrets.items():
        watches.setdefault(secret.dest_for(name), "gpunode-secrets")
    for path in watches:
        if not _AIDE_PATH_RE.fullmatch(path) or "/../" in f"{path}/":
            raise ValueError(f"{path!r} is not a plain absolute path")
    return sorted(watches.items(), key=lambda item: -item[0].count("/"))


def render_audit_rules(config: NodeConfig) -> str:
    return (
        environment("hardening")
        .get_template("audit.rules.j2")
        .render(
            watches=audit_watches(config),
            syscalls=[(key, ",".join(names)) for key, names in AUDIT_SYSCALLS.items()],
            root_commands=AUDIT_ROOT_COMMANDS_KEY,
        )
    )


def render_auditd_conf(config: NodeConfig, family: str) -> str:
    audit = config.hardening.audit
    return (
        environment("hardening")
        .get_template("auditd.conf.j2")
        .render(
            log_group=AUDIT_LOG_GROUP[family],
            max_log_file=audit.max_log_file_mb,
            num_logs=audit.num_logs,
        )
    )


def render_audit_grub_dropin() -> str:
    """The GRUB drop-in that puts AUDIT_BOOT_ARGS on every entry's kernel command line. It is
    sourced by grub-mkconfig's sh: the arguments are plain words (checked here), appended to
    what /etc/default/grub and the drop-ins before it set."""
    for arg in AUDIT_BOOT_ARGS:
        if not re.fullmatch(r"[a-z0-9_]+=[A-Za-z0-9_.]+", arg):
            raise ValueError(f"{arg!r} is not a plain kernel argument")
    args = " ".join(AUDIT_BOOT_ARGS)
    return (
        "## Managed by gpunode (hardening.audit.boot_args): audit from the first process on\n"
        f'GRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX {args}"\n'
    )


def boot_args_off(cmdline: list[str]) -> list[str]:
    """The AUDIT_BOOT_ARGS not in effect on a kernel command line (its words): absent, or set
    again later to another value (the kernel takes the last one)."""
    off = []
    for arg in AUDIT_BOOT_ARGS:
        key = arg.partition("=")[0] + "="
        values = [word for word in cmdline if word.startswith(key)]
        if not values or values[-1] != arg:
            off.append(arg)
    return off


def audit_load_command(config: NodeConfig) -> str:
    """Load the rules into the kernel (augenrules: the distro's rules files, then gpunode's).
    A watch needs its parent directory: missing ones are made (root 0755) first. Rules locked
    until reboot (``-e 2``) fail the host with the reason."""
    parents = sorted({str(PurePosixPath(path).parent) for path, _ in audit_watches(config)})
    return "\n".join(
        [
            "if auditctl -s | grep -qx 'enabled 2'; then",
            "  echo 'gpunode: the audit rules are locked until the next boot (hardening.audit."
            "immutable): reboot the node to load the new ones' >&2",
            "  exit 1",
            "fi",
            f"for d in {' '.join(shlex.quote(p) for p in parents)}; do",
            '  [ -d "$d" ] || install -d -m 755 -o root -g root "$d"',
            "done",
            "augenrules --load",
        ]
    )


def integrity_check_command(family: str) -> str:
    """What gpunode-file-integrity.service runs: exit status 0 when nothing differs."""
    return f"{AIDE_BINARY[family]} --config={AIDE_CONF} --check"


def aide_init_command(family: str) -> str:
    """A new database of the watched files, put in place only when AIDE succeeded."""
    aide = AIDE_BINARY[family]
    return "\n".join(
        [
            "set -e",
            f"install -d -m 700 -o root -g root {AIDE_DIR}",
            f"rm -f {AIDE_DB_NEW}",
            f"{aide} --config={AIDE_CONF} --init >/dev/null",
            f"chmod 600 {AIDE_DB_NEW}",
            f"mv -f {AIDE_DB_NEW} {AIDE_DB}",
        ]
    )


def aide_update_command(family: str, by: str = "a gpunode deploy") -> str:
    """Take a deploy's changes (or those of ``by``) into the database: AIDE reports what differs
    (exit status 1 to 7: entries added, removed, changed), each difference goes to the journal
    (``gpunode-file-integrity``, authpriv.notice, "taken in by ``by``: ...") so none is taken in
    silently, then the new database replaces the old one. Exit status 8 and above is AIDE's own
    error: the old database stays. A host without a database (the hardening role never ran
    there: a GPU stack deploy alone) has nothing to update."""
    if not re.fullmatch(r"[a-z][a-z0-9 .()-]*", by):
        raise ValueError(f"{by!r}: not a plain description")  # it goes in a sed replacement
    aide = AIDE_BINARY[family]
    return "\n".join(
        [
            f"[ -s {AIDE_DB} ] && [ -x {aide} ] || exit 0",
            f"report=$(mktemp {AIDE_DIR}/.report.XXXXXX) || exit 1",
            "rc=0",
            f'{aide} --config={AIDE_CONF} --update >"$report" 2>&1 || rc=$?',
            'if [ "$rc" -gt 7 ]; then',
            '  echo "gpunode: AIDE could not update its database (exit status $rc):" >&2',
            '  tail -n 20 "$report" >&2; rm -f "$report"; exit 1',
            "fi",
            "grep -E '^[a-z!][^:]*: /' \"$report\" | sed 's/^/taken in by " + by + ": /' "
            "| logger -t gpunode-file-integrity -p authpriv.notice || true",
            'rm -f "$report"',
            f"chmod 600 {AIDE_DB_NEW}",
            f"mv -f {AIDE_DB_NEW} {AIDE_DB}",
        ]
    )


def integrity_update_dropin(family: str) -> str:
    """The drop-in that makes the automatic upgrades' unit want INTEGRITY_UPDATE_SERVICE."""
    return f"/etc/systemd/system/{AUTO_UPGRADE_SERVICE[family]}.d/60-gpunode-file-integrity.conf"


def integrity_update_script(family: str) -> str:
    """INTEGRITY_UPDATE_SCRIPT: the update command, when a package was installed, upgraded or
    removed after AIDE's database was written (the package database is newer); else nothing."""
    service = AUTO_UPGRADE_SERVICE[family]
    return "\n".join(
        [
            "#!/bin/sh",
            "# Managed by gpunode (roles/hardening.py, hardening.file_integrity with",
            f"# base.auto_updates). Local changes are overwritten. Run once {service} ran.",
            f"packages={PACKAGE_DATABASE[family]}",
            f'if [ -e "$packages" ] && [ -s {AIDE_DB} ] && ! [ "$packages" -nt {AIDE_DB} ]; then',
            '  echo "no package changed since the file integrity database was written"',
            "  exit 0",
            "fi",
            aide_update_command(family, by=f"the automatic upgrades ({service})"),
            "",
        ]
    )


def render_integrity_update(family: str) -> dict[str, str]:
    """Path -> text: the script, its unit, and the drop-in on the automatic upgrades' unit."""
    env = environment("hardening")
    service = AUTO_UPGRADE_SERVICE[family]
    return {
        INTEGRITY_UPDATE_SCRIPT: integrity_update_script(family),
        f"/etc/systemd/system/{INTEGRITY_UPDATE_SERVICE}": env.get_template(
            "file-integrity-update.service.j2"
        ).render(after=service, script=INTEGRITY_UPDATE_SCRIPT, aide_dir=AIDE_DIR),
        integrity_update_dropin(family): env.get_template("file-integrity-update.conf.j2").render(
            service=INTEGRITY_UPDATE_SERVICE
        ),
    }


def check_host(where: str, config: NodeConfig, connection: Connection) -> list[str]:
    """Checks that need the merged config (and the host's connection); [] when fine."""
    problems: list[str] = []
    if config.hardening.enabled and connection.user == "root":
        if config.hardening.ssh.permit_root_login == "no":
            problems.append(
                f"{where}: hardening.ssh.permit_root_login: 'no' but gpunode connects as root "
                "(connection.user), so the run would lock itself out (allowed: prohibit-password, "
                "or connect as an admin user with sudo)"
            )
    return problems


SSHD = "/usr/sbin/sshd"


def install_sshd_command(service: str) -> str:
    """Validate the staged drop-in alone, put it in place, validate the whole config, and
    reload sshd only if that passed; otherwise restore the previous drop-in (or none)."""
    previous = f"{SSHD_STAGED}.previous"
    return "\n".join(
        [
            "set -e",
            f"{SSHD} -t -f {SSHD_STAGED}",
            f"if [ -e {SSHD_DROPIN} ]; then cp -p {SSHD_DROPIN} {previous}; "
            f"else rm -f {previous}; fi",
            f"install -m 600 -o root -g root {SSHD_STAGED} {SSHD_DROPIN}",
            f"if ! {SSHD} -t; then",
            f"  if [ -e {previous} ]; then install -m 600 {previous} {SSHD_DROPIN}; "
            f"else rm -f {SSHD_DROPIN}; fi",
            "  echo 'gpunode: sshd -t refused the hardened config: the previous one is back, "
            "sshd was not reloaded' >&2",
            "  exit 1",
            "fi",
            f"systemctl try-reload-or-restart {service}",
        ]
    )


# --- remote logs (rsyslog over TLS) ---------------------------------------------------------

CA_MAX_BYTES = 1 << 20  # a CA bundle of a few certificates: far less


class RemoteLogsCaError(PyinfraError):
    """``hardening.remote_logs.ca_file`` cannot be used. Raised while the deploy file runs, it
    stops the whole run with its message before any operation on any host."""


def remote_logs_packages(family: str) -> list[str]:
    return list(REMOTE_LOGS_PACKAGES[family])


def remote_logs_ca(host_name: str, path: str, now: datetime | None = None) -> str:
    """The CA certificates of ``hardening.remote_logs.ca_file`` (``path``, on the machine that
    runs the deploy) as the PEM text the node gets: each certificate re-encoded from what was
    parsed, nothing else of the file (comments, other blocks) carried over. Refused with
    :class:`RemoteLogsCaError` naming the host, the key and the file, and never echoing the
    file: a file that is missing, not regular, empty or over 1 MiB, not ASCII PEM, holding
    any block but certificates (a private key is never uploaded), a certificate that is not a
    CA's (basicConstraints CA:TRUE; keyCertSign when it has a key usage) or not valid now."""
    where = f"host {host_name}: hardening.remote_logs.ca_file: {path}"
    allowed = (
        "(allowed: a PEM file of at most 1 MiB holding only CA certificates: basicConstraints "
        "CA:TRUE, valid now)"
    )

    def refuse(reason: str) -> RemoteLogsCaError:
        return RemoteLogsCaError(f"{where}: {reason} {allowed}")

    try:
        fd = os.open(Path(path).expanduser(), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise refuse((exc.strerror or str(exc)).lower()) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise refuse("not a regular file")
        data = os.read(fd, CA_MAX_BYTES + 1)
    except OSError as exc:
        raise refuse((exc.strerror or str(exc)).lower()) from None
    finally:
        os.close(fd)
    if len(data) > CA_MAX_BYTES:
        raise refuse("larger than 1 MiB")
    if not data.strip():
        raise refuse("the file is empty")
    if not data.isascii():
        raise refuse("not a PEM file (it holds non-ASCII bytes)")
    labels = re.findall(rb"^-----BEGIN ([A-Z0-9 ]+)-----\r?$", data, re.M)
    if not labels:
        raise refuse("no PEM certificate in it")
    others = sorted({label.decode() for label in labels} - {"CERTIFICATE"})
    if others:
        raise refuse(f"it holds {', '.join(others)} block(s), which are never uploaded")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise refuse("a certificate in it cannot be parsed") from None
    moment = now or datetime.now(UTC)
    for number, cert in enumerate(certs, start=1):
        subject = cert.subject.rfc4514_string()[:120] or "(no subject)"
        what = f"certificate {number} ({subject})"
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise refuse(f"{what} is not a CA certificate (its basicConstraints lack CA:TRUE)")
        try:
            usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            usage = None
        if usage is not None and not usage.key_cert_sign:
            raise refuse(f"{what} may not sign certificates (its key usage lacks keyCertSign)")
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        if moment < start:
            raise refuse(f"{what} is not valid before {start:%Y-%m-%d %H:%M} UTC")
        if moment > end:
            raise refuse(f"{what} expired on {end:%Y-%m-%d %H:%M} UTC")
    return "".join(cert.public_bytes(Encoding.PEM).decode() for cert in certs)


def remote_logs_off_command(family: str) -> str:
    """After the drop-in is gone: rsyslog restarted where it runs (it then no longer has the
    action), then the forwarding queue's files removed (what was still waiting for the log
    host; it stays in the local journal)."""
    queue = f"{RSYSLOG_WORK_DIR[family]}/{REMOTE_LOGS_QUEUE}"
    return f"systemctl try-restart rsyslog.service && rm -f {queue}.*"


def render_remote_logs(config: NodeConfig, family: str) -> str:
    """/etc/rsyslog.d/60-gpunode-remote.conf: one omfwd action that forwards every message to
    hardening.remote_logs over TLS, every value a RainerScript string
    (:func:`gpunode.render.rainerscript_string`)."""
    logs = config.hardening.remote_logs
    if logs is None:
        raise ValueError("hardening.remote_logs is null: nothing to render")
    host = rainerscript_string(logs.host, "hardening.remote_logs.host")
    # the rest are gpunode's own constants and validated integers: escaped all the same
    values = {
        "target": host,
        "port": rainerscript_string(logs.port),
        "peer": host,
        "ca_file": rainerscript_string(REMOTE_LOGS_CA),
        "queue_file": rainerscript_string(REMOTE_LOGS_QUEUE),
        "spool": rainerscript_string(RSYSLOG_WORK_DIR[family]),
        "max_disk": rainerscript_string(logs.queue_max_mb * 1024 * 1024),
    }
    return environment("hardening").get_template("rsyslog-remote.conf.j2").render(**values)
