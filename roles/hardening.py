"""Hardening role: sshd, sysctl and OS controls to the dev-sec baselines' level.

Every value comes from ``NodeConfig.hardening`` and the tables in
gpunode/schema/hardening.py (sshd options, sysctl keys, packages that must be absent,
files with strict modes).

- sshd: a drop-in that sorts first in ``/etc/ssh/sshd_config.d/`` (sshd takes the first
  value it reads). It is checked with ``sshd -t -f`` on its own, then in place with
  ``sshd -t``; if that fails the previous drop-in is put back and sshd is not reloaded,
  so sshd never runs (or restarts into) a broken config. ``AllowGroups`` lets in the admin
  group and the connection user's primary group (read from the host), so gpunode keeps
  its own way in.
- sudo: ``use_pty`` and a log file in a sudoers drop-in that takes effect only once
  ``visudo`` accepts it (gpunode/operations/sudo.py).
- sysctl: all keys persisted in ``/etc/sysctl.d/60-gpunode-hardening.conf``; network
  keys applied now; kernel-wide keys applied where writable (inside a container they
  are read-only: skipped with a visible notice).
- kernel modules: the uncommon protocols and filesystems of DISABLED_MODULES (less
  ``hardening.allow_modules``, plus ``hardening.disable_modules``) get ``install <m>
  /bin/false`` and ``blacklist <m>`` in ``/etc/modprobe.d/60-gpunode-modules.conf``; in a
  container the file is written and a notice says the kernel is not the host's own.
- after upgrades: needrestart restarts daemons still running old libraries automatically
  (but lists only the inference services and the gateway, which ``gpunode rollout``
  restarts behind a health gate); gpunode-package-verify.timer checks every package's files
  against their checksums (debsums, ``rpm --verify``) and fails on a changed one.
- audit trail: auditd with gpunode's rules (``/etc/audit/rules.d/60-gpunode.rules``: identity
  files, sudoers, sshd, gpunode's files and secrets, units, module loading, time changes, every
  program run as root by a logged-in user), logs bounded by size and count, ``-e 2`` when
  ``hardening.audit.immutable``; ``audit=1 audit_backlog_limit=8192`` on every GRUB entry
  (a drop-in in /etc/default/grub.d, then ``update-grub``) so that what starts before auditd
  is audited too, with a notice until the node has booted with them. In a container the
  kernel's audit is the machine's underneath: nothing is installed, a notice says so.
- file integrity: AIDE with gpunode's settings (/etc/gpunode/aide.conf, AIDE_WATCH) and a
  database made here; gpunode-file-integrity.timer compares. :func:`file_integrity` (run
  last in a deploy, before the seal) takes that deploy's own changes into the database.
- remote logs (``hardening.remote_logs``): rsyslog (with its GnuTLS driver) forwards every
  message of the journal to the central log host over TLS, trusting only the configured CA
  and the host's name, through a disk-assisted queue bounded in size. The drop-in takes
  effect only once ``rsyslogd -N1`` accepts it (gpunode/operations/rsyslog.py); rsyslog is
  restarted only when it or the CA changed. null removes gpunode's files (rsyslog stays).
- core dumps off, telnet/rsh/NIS/TFTP/inetd absent, strict modes on /etc/shadow & co.

.. code:: python

    from roles.hardening import hardening
    hardening()
"""

from __future__ import annotations

from io import StringIO

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.files import File
from pyinfra.facts.rpm import RpmPackages
from pyinfra.operations import apt, dnf, files, server, systemd

from gpunode import hardening as rules
from gpunode.base import host_matches
from gpunode.facts.hardening import (
    AuditBoot,
    PasswordAccounts,
    PrimaryGroup,
    SshdState,
    WritableSysctls,
)
from gpunode.facts.server import HostInfo
from gpunode.firewall import sha1
from gpunode.inventory import node_and_distro
from gpunode.operations.files import file_mode
from gpunode.operations.hardening import key_values, password_aging, sysctl_values
from gpunode.operations.packages import apt_update
from gpunode.operations.rsyslog import rsyslog_dropin
from gpunode.operations.server import fail, notice
from gpunode.operations.sudo import sudoers_dropin
from gpunode.paths import template
from gpunode.schema import distros
from gpunode.schema.hardening import (
    ABSENT_PACKAGES,
    AUDIT_BOOT_ARGS,
    AUDIT_BOOT_BY_HAND,
    AUDIT_BOOT_LOADER,
    AUDIT_PACKAGE,
    JOURNAL_TO_RSYSLOG,
    PAM_TMPDIR_PACKAGE,
    STRICT_FILES,
)
from gpunode.schema.node import NodeConfig


@deploy("gpunode hardening")
def hardening() -> None:
    config, spec = node_and_distro(host)
    if not host_matches(spec, host.get_fact(HostInfo)):
        return  # roles/base.py has failed this host with the reason
    if not config.hardening.enabled:
        notice(name="Hardening", message="hardening.enabled is false: skipped")
        return
    _sshd(config, spec)
    sudoers_dropin(
        name="sudo defaults (use_pty, log file)",
        path=rules.SUDO_DROPIN,
        content=rules.render_sudo_defaults(config),
    )
    _sysctl(config)
    _modules(config, host.get_fact(HostInfo)["container"])
    _banner(config)
    _login(config, spec)
    _core_dumps(config)
    _packages(config, spec)
    _after_upgrades(config, spec)
    _file_modes(config, spec)
    _remote_logs(config, spec)
    _audit(config, spec, host.get_fact(HostInfo)["container"])
    _integrity(config, spec)


def _sshd(config: NodeConfig, spec: distros.DistroSpec) -> None:
    state = host.get_fact(SshdState)
    if not state["includes_dropins"]:
        fail(
            name="Check sshd_config includes sshd_config.d",
            message=(
                f"host {host.name}: hardening: /etc/ssh/sshd_config has no "
                "'Include /etc/ssh/sshd_config.d/*.conf' line, so the hardened drop-in would "
                "not be read (allowed: add that line at the top of sshd_config, as the "
                "distro's own file does)"
            ),
        )
        return
    user = str(host.data.get("ssh_user") or "root")
    group = host.get_fact(PrimaryGroup, user=user)
    try:
        wanted = rules.render_sshd(config, user, group or "")
    except ValueError as exc:
        fail(
            name="Check the connection user's group",
            message=f"host {host.name}: hardening: sshd AllowGroups: {exc}",
        )
        return
    if state["dropin_sha1"] == sha1(wanted):
        return
    files.directory(
        name="sshd staging directory",
        path="/etc/gpunode/sshd",
        mode="700",
        user="root",
        group="root",
    )
    files.put(
        name="sshd hardening (staged)",
        src=StringIO(wanted),
        dest=rules.SSHD_STAGED,
        mode="600",
        user="root",
        group="root",
    )
    server.shell(
        name="Validate and install the sshd hardening, reload sshd",
        commands=[rules.install_sshd_command(rules.SSHD_SERVICE[spec.family])],
    )


def _sysctl(config: NodeConfig) -> None:
    values = rules.sysctl_settings(config)
    files.put(
        name="sysctl hardening (persisted)",
        src=StringIO(rules.render_sysctl(config)),
        dest=rules.SYSCTL_FILE,
        mode="644",
        user="root",
        group="root",
    )
    network = {k: v for k, v in values.items() if not rules.is_kernel_key(k)}
    kernel = {k: v for k, v in values.items() if rules.is_kernel_key(k)}
    writable = host.get_fact(WritableSysctls, keys=sorted(kernel))
    read_only = sorted(k for k in kernel if not writable.get(k))
    sysctl_values(name="Network sysctls", values=network)
    sysctl_values(
        name="Kernel sysctls", values={k: v for k, v in kernel.items() if k not in read_only}
    )
    if read_only:
        notice(
            name="Kernel sysctls",
            message=(
                f"read-only here (a container?): {', '.join(read_only)} persisted in "
                f"{rules.SYSCTL_FILE}, not applied"
            ),
        )


def _banner(config: NodeConfig) -> None:
    if config.hardening.banner is None:
        return  # the distro's own files, no sshd Banner
    for path, net in ((rules.ISSUE_FILE, False), (rules.ISSUE_NET_FILE, True)):
        files.put(
            name=f"Login banner ({path})",
            src=StringIO(rules.render_issue(config, net=net)),
            dest=path,
            user="root",
            group="root",
            mode="644",
        )


def _login(config: NodeConfig, spec: distros.DistroSpec) -> None:
    login = config.hardening.login
    key_values(
        name="Login defaults (login.defs: umask, password aging, hashing)",
        path=rules.LOGIN_DEFS,
        values=rules.login_defs(config),
    )
    files.put(
        name="Login shells' umask",
        src=StringIO(rules.render_profile_umask(config)),
        dest=rules.PROFILE_UMASK,
        user="root",
        group="root",
        mode="644",
    )
    user = str(host.data.get("ssh_user") or "root")
    password_aging(
        name="Password aging (accounts with a password)",
        minimum=login.password_min_days,
        maximum=login.password_max_days,
        warn=login.password_warn_days,
        skip=(user,),
    )
    if user in host.get_fact(PasswordAccounts):
        notice(
            name="Password aging",
            message=(
                f"{user}, the account gpunode connects as, has a password: its aging is left "
                "as it is (an expired password would refuse its SSH key too)"
            ),
        )
    package = PAM_TMPDIR_PACKAGE[spec.family]
    if package is None:
        if login.private_tmp:
            notice(
                name="Private TMPDIR",
                message=(
                    f"pam_tmpdir is not packaged on {spec.key}: logins share /tmp "
                    "(hardening.login.private_tmp: false silences this)"
                ),
            )
    elif login.private_tmp:
        _install(spec, "Private TMPDIR per login (pam_tmpdir)", [package])
    else:
        apt.packages(name="Private TMPDIR per login (off)", packages=[package], present=False)


def _modules(config: NodeConfig, container: str) -> None:
    files.put(
        name="Kernel modules turned off (modprobe.d)",
        src=StringIO(rules.render_modprobe(config)),
        dest=rules.MODPROBE_FILE,
        user="root",
        group="root",
        mode="644",
    )
    if container:
        notice(
            name="Kernel modules",
            message=(
                f"the kernel is the one of the machine underneath ({container}): "
                f"{rules.MODPROBE_FILE} is written, modules are refused where this host boots "
                "its own kernel"
            ),
        )


def _core_dumps(config: NodeConfig) -> None:
    if config.hardening.core_dumps:
        files.file(name="Core dump limit (none)", path=rules.CORE_LIMITS_FILE, present=False)
        files.file(
            name="systemd-coredump (distro default)", path=rules.COREDUMP_DROPIN, present=False
        )
        return
    files.put(
        name="Core dump limit",
        src=template("hardening/core-limits.conf"),
        dest=rules.CORE_LIMITS_FILE,
        mode="644",
        user="root",
        group="root",
    )
    files.put(
        name="systemd-coredump stores nothing",
        src=template("hardening/coredump.conf"),
        dest=rules.COREDUMP_DROPIN,
        mode="644",
        user="root",
        group="root",
    )


def _packages(config: NodeConfig, spec: distros.DistroSpec) -> None:
    if not config.hardening.remove_insecure_packages:
        return
    absent = list(ABSENT_PACKAGES[spec.family])
    if spec.family == "apt":
        apt.packages(name="Insecure legacy services absent", packages=absent, present=False)
    else:
        dnf.packages(name="Insecure legacy services absent", packages=absent, present=False)


def _install(spec: distros.DistroSpec, what: str, packages: list[str]) -> None:
    if spec.family == "apt":
        # Refresh the lists only when something is to be installed (0 changes when converged).
        if any(p not in host.get_fact(DebPackages) for p in packages):
            apt_update(name=f"Refresh apt package lists ({what})")
        apt.packages(name=what, packages=packages, no_recommends=True)
    else:
        dnf.packages(name=what, packages=packages)


def _after_upgrades(config: NodeConfig, spec: distros.DistroSpec) -> None:
    hard = config.hardening
    if not hard.restart_services:
        files.file(name="needrestart settings (none)", path=rules.NEEDRESTART_FILE, present=False)
    elif spec.family == "dnf" and "epel-release" not in host.get_fact(RpmPackages):
        notice(
            name="needrestart",
            message=(
                "needrestart comes from EPEL (and CRB) on EL9, and EPEL is not set up here: "
                "daemons are not restarted after upgrades (set up EPEL, or set "
                "hardening.restart_services: false)"
            ),
        )
    else:
        _install(spec, "needrestart", rules.restart_packages(spec.family))
        files.put(
            name="needrestart: restart automatically, inference listed only",
            src=StringIO(rules.render_needrestart()),
            dest=rules.NEEDRESTART_FILE,
            user="root",
            group="root",
            mode="644",
        )
    if hard.verify_packages is None:
        systemd.service(
            name="Package verification timer (off)",
            service=rules.VERIFY_TIMER,
            running=False,
            enabled=False,
        )
        for unit in (rules.VERIFY_TIMER, rules.VERIFY_SERVICE):
            files.file(
                name=f"Package verification unit (none): {unit}",
                path=f"/etc/systemd/system/{unit}",
                present=False,
            )
        return
    _install(spec, "Package verification tool", [rules.verify_package(spec.family)])
    _timer("Package verification", rules.render_verify_units(config, spec.family))


def _file_modes(config: NodeConfig, spec: distros.DistroSpec) -> None:
    if not config.hardening.strict_file_modes:
        return
    for entry in STRICT_FILES[spec.family]:
        file_mode(
            name="Strict owner and mode",
            path=entry.path,
            user=entry.user,
            group=entry.group,
            mode=entry.mode,
        )


def _remote_logs(config: NodeConfig, spec: distros.DistroSpec) -> None:
    logs = config.hardening.remote_logs
    forward = JOURNAL_TO_RSYSLOG[spec.family] == "forward"
    if logs is None:
        removed = [
            files.file(name=f"Remote logs (none): {path}", path=path, present=False)
            for path in (rules.REMOTE_LOGS_CONF, rules.REMOTE_LOGS_CA)
        ]
        journald = files.file(
            name="Remote logs (none): journald drop-in",
            path=rules.REMOTE_LOGS_JOURNALD,
            present=False,
        )
        systemd.service(
            name="Restart journald (remote logs off)",
            service="systemd-journald.service",
            restarted=True,
            _if=journald.did_change,
        )
        server.shell(  # rsyslog without the action (if it runs), then its queue's files go
            name="Restart rsyslog without the forwarding (remote logs off)",
            commands=[rules.remote_logs_off_command(spec.family)],
            _if=removed[0].did_change,
        )
        return
    ca = rules.remote_logs_ca(host.name, logs.ca_file)  # refused here: before any host changes
    _install(spec, "rsyslog with TLS", rules.remote_logs_packages(spec.family))
    if forward:
        journald = files.put(
            name="journald hands the journal to rsyslog",
            src=template("hardening/journald-forward.conf"),
            dest=rules.REMOTE_LOGS_JOURNALD,
            user="root",
            group="root",
            mode="644",
        )
        systemd.service(
            name="Restart journald (forward to rsyslog)",
            service="systemd-journald.service",
            restarted=True,
            _if=journald.did_change,
        )
    trust = files.put(
        name="Remote logs: the log host's CA",
        src=StringIO(ca),
        dest=rules.REMOTE_LOGS_CA,
        user="root",
        group="root",
        mode="644",
    )
    dropin = rsyslog_dropin(
        name="Remote logs: forward the journal over TLS (checked by rsyslogd -N1)",
        path=rules.REMOTE_LOGS_CONF,
        content=rules.render_remote_logs(config, spec.family),
    )
    systemd.service(name="rsyslog running", service="rsyslog.service", running=True, enabled=True)
    systemd.service(
        name="Restart rsyslog (remote logs changed)",
        service="rsyslog.service",
        restarted=True,
        _if=lambda: trust.did_change() or dropin.did_change(),
    )


def _units(what: str, units: dict[str, str]) -> list:
    return [
        files.put(
            name=f"{what} unit {unit}",
            src=StringIO(text),
            dest=f"/etc/systemd/system/{unit}",
            user="root",
            group="root",
            mode="644",
        )
        for unit, text in units.items()
    ]


def _audit(config: NodeConfig, spec: distros.DistroSpec, container: str) -> None:
    audit = config.hardening.audit
    if not audit.enabled:
        for path in (rules.AUDIT_RULES, rules.AUDIT_IMMUTABLE_RULES):
            files.file(name=f"Audit rules (none): {path}", path=path, present=False)
        _audit_boot(spec, wanted=False)
        return
    if container:
        notice(
            name="Audit trail",
            message=(
                f"the kernel's audit belongs to the machine underneath ({container}): auditd "
                "is not installed here; it is where the host boots its own kernel"
            ),
        )
        return
    _install(spec, "auditd", [AUDIT_PACKAGE[spec.family]])
    conf = files.put(
        name="auditd settings (log size and count)",
        src=StringIO(rules.render_auditd_conf(config, spec.family)),
        dest=rules.AUDITD_CONF,
        user="root",
        group="root",
        mode="640",
    )
    rules_file = files.put(
        name="Audit rules",
        src=StringIO(rules.render_audit_rules(config)),
        dest=rules.AUDIT_RULES,
        user="root",
        group="root",
        mode="640",
    )
    if audit.immutable:
        lock = files.put(
            name="Audit rules locked until reboot",
            src=StringIO("## Managed by gpunode (hardening.audit.immutable): last rule\n-e 2\n"),
            dest=rules.AUDIT_IMMUTABLE_RULES,
            user="root",
            group="root",
            mode="640",
        )
    else:
        lock = files.file(
            name="Audit rules not locked", path=rules.AUDIT_IMMUTABLE_RULES, present=False
        )
    systemd.service(name="auditd running", service="auditd.service", running=True, enabled=True)
    server.shell(
        name="auditd reads its settings again",
        commands=["systemctl kill --signal=HUP auditd.service"],
        _if=conf.did_change,
    )
    server.shell(
        name="Load the audit rules",
        commands=[rules.audit_load_command(config)],
        _if=lambda: rules_file.did_change() or lock.did_change(),
    )
    _audit_boot(spec, wanted=audit.boot_args)


def _audit_boot(spec: distros.DistroSpec, wanted: bool) -> None:
    """AUDIT_BOOT_ARGS on the kernel command line of the next boots, through update-grub
    where the host has it (AUDIT_BOOT_LOADER); a notice while the running kernel lacks them.
    Not ``wanted``: gpunode's drop-in goes, and GRUB's configuration is made again."""
    boot = host.get_fact(AuditBoot)
    loader = AUDIT_BOOT_LOADER[spec.family]
    managed = loader == "update-grub" and boot["update_grub"] and boot["generated"]
    if not wanted:
        removed = files.file(
            name="Audit from boot (off): GRUB drop-in", path=rules.AUDIT_GRUB_DROPIN, present=False
        )
        if managed:
            server.shell(
                name="GRUB's configuration made again (update-grub)",
                commands=["update-grub"],
                _if=removed.did_change,
            )
        return
    args = " ".join(AUDIT_BOOT_ARGS)
    if not managed:
        if rules.boot_args_off(boot["running"]):
            how = AUDIT_BOOT_BY_HAND[spec.family].format(args=args)
            why = (
                f"not on {spec.key}"
                if not loader
                else "no update-grub on this host"
                if not boot["update_grub"]
                else f"{rules.GRUB_CFG} is missing or not grub-mkconfig's, which update-grub "
                "would replace"
            )
            notice(
                name="Audit from boot",
                message=(
                    f"the running kernel lacks {args}, and gpunode does not set the kernel's "
                    f"command line here ({why}): until it has them, what starts before auditd "
                    f"(systemd itself among them) is not audited; {how} "
                    "(hardening.audit.boot_args: false silences this)"
                ),
            )
        return
    dropin = files.put(
        name="Audit from boot: GRUB drop-in",
        src=StringIO(rules.render_audit_grub_dropin()),
        dest=rules.AUDIT_GRUB_DROPIN,
        user="root",
        group="root",
        mode="644",
    )
    # every entry has the words unless update-grub has not run since the drop-in came (or
    # failed): run it then too, so an interrupted run converges on the next one
    stale = any(arg not in entry for entry in boot["entries"] for arg in AUDIT_BOOT_ARGS)
    server.shell(
        name="GRUB's configuration made again (update-grub)",
        commands=["update-grub"],
        _if=lambda: dropin.did_change() or stale,
    )
    overridden = [entry for entry in boot["entries"] if rules.boot_args_off(entry)]
    if overridden and not stale:
        notice(
            name="Audit from boot",
            message=(
                f"{rules.GRUB_CFG} has {args}, but a later setting on the same command line "
                f"undoes {', '.join(rules.boot_args_off(overridden[0]))} (the kernel takes "
                "the last value: look at GRUB_CMDLINE_LINUX_DEFAULT and /etc/default/grub.d)"
            ),
        )
    elif rules.boot_args_off(boot["running"]):
        notice(
            name="Audit from boot",
            message=(
                f"{args} take effect at the next boot: until then, what started before "
                "auditd (systemd itself among them) is not audited"
            ),
        )


def _timer(what: str, units: dict[str, str]) -> None:
    """A service and its timer (``units``: service, then timer): written, systemd reloaded,
    the timer enabled and running, restarted when its schedule changed."""
    written = _units(what, units)
    systemd.daemon_reload(
        name=f"systemd daemon-reload ({what.lower()})",
        _if=lambda: any(u.did_change() for u in written),
    )
    timer = list(units)[1]
    systemd.service(name=f"{what} timer", service=timer, running=True, enabled=True)
    systemd.service(
        name=f"Restart {what.lower()} timer",  # applies a new schedule
        service=timer,
        restarted=True,
        _if=written[1].did_change,
    )


def _integrity(config: NodeConfig, spec: distros.DistroSpec) -> None:
    if config.hardening.file_integrity is None:
        systemd.service(
            name="File integrity timer (off)",
            service=rules.INTEGRITY_TIMER,
            running=False,
            enabled=False,
        )
        for path in (
            *(f"/etc/systemd/system/{u}" for u in (rules.INTEGRITY_TIMER, rules.INTEGRITY_SERVICE)),
            rules.AIDE_CONF,
        ):
            files.file(name=f"File integrity (none): {path}", path=path, present=False)
        _integrity_after_upgrades(spec, on=False)
        return
    _install(spec, "AIDE", ["aide"])
    files.directory(
        name="File integrity database folder",
        path=rules.AIDE_DIR,
        user="root",
        group="root",
        mode="700",
    )
    conf = files.put(
        name="File integrity settings (AIDE)",
        src=StringIO(rules.render_aide(config, spec.key, spec.family)),
        dest=rules.AIDE_CONF,
        user="root",
        group="root",
        mode="600",
    )
    database = host.get_fact(File, path=rules.AIDE_DB)
    server.shell(
        name="File integrity database (new)",
        commands=[rules.aide_init_command(spec.family)],
        _if=lambda: not database or conf.did_change(),
    )
    _timer("File integrity", rules.render_integrity_units(config, spec.family))
    _integrity_after_upgrades(spec, on=config.base.auto_updates.enabled)


def _integrity_after_upgrades(spec: distros.DistroSpec, on: bool) -> None:
    """With automatic upgrades on, AIDE takes their changes in once they ran (a drop-in on
    their unit wants gpunode-file-integrity-update.service): a security update is not reported
    as tampering the next day. Off: the three files are removed."""
    wanted = rules.render_integrity_update(spec.family)
    if on:
        written = [
            files.put(
                name=f"File integrity after automatic upgrades: {path}",
                src=StringIO(text),
                dest=path,
                user="root",
                group="root",
                mode="700" if path == rules.INTEGRITY_UPDATE_SCRIPT else "644",
            )
            for path, text in wanted.items()
        ]
    else:
        written = [
            files.file(
                name=f"File integrity after automatic upgrades (off): {path}",
                path=path,
                present=False,
            )
            for path in wanted
        ]
    systemd.daemon_reload(
        name="systemd daemon-reload (file integrity after automatic upgrades)",
        _if=lambda: any(op.did_change() for op in written),
    )


def _changed_before_now() -> bool:
    """Whether an operation of this run changed this host (those run so far)."""
    state = host.state
    return any(
        data.operation_meta.is_complete() and data.operation_meta.did_change()
        for data in state.ops[host].values()
    )


@deploy("gpunode file integrity")
def file_integrity() -> None:
    """Run last in a deploy (before the seal): the changes this run made to watched files go
    into AIDE's database, each written to the journal first, so a deploy is not reported as
    tampering. Nothing runs on a host this run did not change.

    .. code:: python

        from roles.hardening import file_integrity
        file_integrity()
    """
    config, spec = node_and_distro(host)
    if not config.hardening.enabled or config.hardening.file_integrity is None:
        return
    server.shell(
        name="File integrity database: this deploy's changes",
        commands=[rules.aide_update_command(spec.family)],
        _if=_changed_before_now,
    )
