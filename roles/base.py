"""Base role: the OS layer every gpunode host gets.

Package source (proxy, mirror), base packages, admin users with SSH keys and
sudo, hostname, journald limits, chrony, and automatic security updates that
never touch the packages on the hold list (kernel, NVIDIA, CUDA). Everything it
reads is in ``NodeConfig.base`` (gpunode/schema/base.py); distro differences come
from gpunode/schema/distros.py.

.. code:: python

    from roles.base import base
    base()
"""

from __future__ import annotations

from io import StringIO

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.deb import DebPackages
from pyinfra.operations import apt, dnf, files, server, systemd

from gpunode.base import (
    ADMIN_SUDOERS,
    APT_LOCK_FILE,
    DNF_CONF,
    NODE_DIRS,
    SECURITY_LIST,
    hold_patterns,
    host_matches,
    render_admin_sudoers,
    render_apt_lock_timeout,
    security_mirror,
    security_source,
)
from gpunode.facts.server import AptSources, HostInfo
from gpunode.inventory import node_and_distro
from gpunode.operations.ini import ini_value
from gpunode.operations.packages import apt_update
from gpunode.operations.server import fail, notice
from gpunode.operations.sudo import sudoers_dropin
from gpunode.paths import template
from gpunode.schema import distros
from gpunode.schema.node import NodeConfig


@deploy("gpunode base")
def base() -> None:
    config, spec = node_and_distro(host)
    info = host.get_fact(HostInfo)
    if not host_matches(spec, info):
        fail(
            name="Check the host runs the declared distro",
            message=(
                f"host {host.name}: distro: declared {config.distro}, but the host runs "
                f"{info['id'] or '?'} {info['version_id'] or '?'} (allowed: fix `distro` for this "
                "host in the inventory)"
            ),
        )
        return

    for path, mode in NODE_DIRS.items():
        files.directory(name="gpunode directory", path=path, user="root", group="root", mode=mode)
    if spec.family == "apt":
        _apt_sources(config, spec)
    else:
        _dnf_sources(config)
    _packages(config, spec)
    _admin_users(config, spec)
    server.hostname(name="Set the hostname", hostname=config.base.hostname or host.name)
    _journald(config)
    _chrony(config, spec, in_container=bool(info["container"]))
    _auto_updates(config, spec)


def _apt_sources(config: NodeConfig, spec: distros.DistroSpec) -> None:
    files.put(
        name="apt waits for the package lock",
        src=StringIO(render_apt_lock_timeout()),
        dest=APT_LOCK_FILE,
        user="root",
        group="root",
        mode="644",
    )
    if config.base.apt_proxy:
        files.template(
            name="apt proxy",
            src=template("base/apt-proxy.conf.j2"),
            dest="/etc/apt/apt.conf.d/01gpunode-proxy",
            mode="644",
            proxy=config.base.apt_proxy,
            user="root",
            group="root",
        )
    else:
        files.file(
            name="apt proxy (none)", path="/etc/apt/apt.conf.d/01gpunode-proxy", present=False
        )
    if config.base.apt_mirror:
        assert spec.apt_sources_path
        sources = "ubuntu.sources.j2" if spec.apt_sources_format == "deb822" else "sources.list.j2"
        files.template(
            name="apt sources from the mirror",
            src=template("base", sources),
            dest=spec.apt_sources_path,
            mode="644",
            spec=spec,
            mirror=config.base.apt_mirror.rstrip("/"),
            security_mirror=security_mirror(config.base.apt_mirror, spec),
            user="root",
            group="root",
        )
        files.file(name="apt security source (the mirror's)", path=SECURITY_LIST, present=False)
        return
    # The distro's own sources stay; their security suite is added where it is missing, or
    # unattended upgrades would find no security updates.
    try:
        wanted = security_source(spec, host.get_fact(AptSources))
    except ValueError as exc:
        fail(name="Check the apt sources", message=f"host {host.name}: base: apt sources: {exc}")
        return
    if wanted is None:
        files.file(name="apt security source (the host has one)", path=SECURITY_LIST, present=False)
        return
    added = files.put(
        name="apt security source",
        src=StringIO(wanted),
        dest=SECURITY_LIST,
        user="root",
        group="root",
        mode="644",
    )
    apt_update(name="Refresh apt package lists (security source)", _if=added.did_change)


def _dnf_sources(config: NodeConfig) -> None:
    # dnf.conf is an ini file: one key in [main] set through a parser (gpunode/facts/ini.py),
    # never a line appended or matched by a regex.
    ini_value(
        name="dnf proxy",
        path=DNF_CONF,
        section="main",
        key="proxy",
        value=config.base.apt_proxy,
    )


def _packages(config: NodeConfig, spec: distros.DistroSpec) -> None:
    wanted = [*spec.base_packages, *spec.auto_update_packages, *config.base.packages]
    if spec.family == "apt":
        installed = host.get_fact(DebPackages)
        # Refresh the lists only when something is to be installed: a converged
        # host then reports no change (and a drift run no false positive).
        if any(pkg not in installed for pkg in wanted):
            apt_update(name="Refresh apt package lists")
        apt.packages(name="Base packages", packages=wanted, no_recommends=True)
    else:
        dnf.packages(name="Base packages", packages=wanted)


def _admin_users(config: NodeConfig, spec: distros.DistroSpec) -> None:
    group = config.base.admin_group
    server.group(name="Admin group", group=group)
    for user in config.base.admin_users:
        server.user(
            name="Admin user",
            user=user.name,
            shell=user.shell,
            groups=[group] if user.sudo else [],
            public_keys=user.ssh_keys,
            delete_keys=True,
            create_home=True,
        )
    sudoers_dropin(  # takes effect only once visudo accepts it
        name="sudo for the admin group", path=ADMIN_SUDOERS, content=render_admin_sudoers(config)
    )


def _journald(config: NodeConfig) -> None:
    conf = files.template(
        name="journald limits",
        src=template("base/journald.conf.j2"),
        dest="/etc/systemd/journald.conf.d/50-gpunode.conf",
        mode="644",
        journald=config.base.journald,
        user="root",
        group="root",
    )
    files.directory(
        name="Persistent journal",
        path="/var/log/journal",
        mode="2755",
        group="systemd-journal",
        user="root",
    )
    systemd.service(
        name="Restart journald",  # applies the new limits
        service="systemd-journald.service",
        restarted=True,
        _if=conf.did_change,
    )


def _chrony(config: NodeConfig, spec: distros.DistroSpec, in_container: bool) -> None:
    conf = files.template(
        name="chrony time sources",
        src=template("base/chrony.conf.j2"),
        dest=spec.chrony_conf,
        mode="644",
        servers=config.base.ntp_servers,
        spec=spec,
        user="root",
        group="root",
    )
    if in_container:
        # The clock belongs to the machine underneath; chronyd skips itself there
        # (ConditionCapability=CAP_SYS_TIME), so only enable it.
        systemd.service(
            name="chrony enabled", service=spec.chrony_service, running=None, enabled=True
        )
        notice(
            name="chrony", message="in a container: chrony enabled, not started (no CAP_SYS_TIME)"
        )
        return
    systemd.service(name="chrony running", service=spec.chrony_service, running=True, enabled=True)
    systemd.service(
        name="Restart chrony", service=spec.chrony_service, restarted=True, _if=conf.did_change
    )


def _auto_updates(config: NodeConfig, spec: distros.DistroSpec) -> None:
    auto = config.base.auto_updates
    hold = hold_patterns(config, spec.family)
    if spec.family == "apt":
        files.template(
            name="Automatic updates schedule",
            src=template("base/apt-auto-upgrades.j2"),
            dest="/etc/apt/apt.conf.d/20auto-upgrades",
            mode="644",
            auto=auto,
            user="root",
            group="root",
        )
        files.template(
            name="Automatic updates hold list",
            src=template("base/apt-unattended-upgrades.j2"),
            dest="/etc/apt/apt.conf.d/52gpunode-unattended-upgrades",
            mode="644",
            auto=auto,
            hold=hold,
            user="root",
            group="root",
        )
        return
    files.template(
        name="Automatic updates (dnf-automatic)",
        src=template("base/dnf-automatic.conf.j2"),
        dest="/etc/dnf/automatic.conf",
        mode="644",
        auto=auto,
        hold=hold,
        user="root",
        group="root",
    )
    assert spec.auto_update_timer
    systemd.service(
        name="Automatic updates timer",
        service=spec.auto_update_timer,
        running=auto.enabled,
        enabled=auto.enabled,
    )
