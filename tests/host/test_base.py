"""Checks for roles/base.py."""

from __future__ import annotations

import pytest

from gpunode.base import APT_LOCK_FILE, APT_LOCK_TIMEOUT_S, hold_patterns
from gpunode.schema import distros
from gpunode.schema.node import Host


def test_distro_is_the_declared_one(host, spec: distros.DistroSpec) -> None:
    assert host.system_info.distribution in spec.os_ids
    assert host.system_info.release.split(".")[0] == spec.version_id.split(".")[0]


def test_base_packages_installed(host, node: Host, spec: distros.DistroSpec) -> None:
    wanted = [*spec.base_packages, *spec.auto_update_packages, *node.config.base.packages]
    missing = [pkg for pkg in wanted if not host.package(pkg).is_installed]
    assert missing == []


def test_hostname(host, node: Host) -> None:
    assert host.check_output("hostname") == (node.config.base.hostname or node.name)


def test_apt_proxy(host, node: Host, spec: distros.DistroSpec) -> None:
    if spec.family != "apt":
        pytest.skip("apt distros only")
    proxy = host.file("/etc/apt/apt.conf.d/01gpunode-proxy")
    if node.config.base.apt_proxy is None:
        assert not proxy.exists
        return
    assert proxy.mode == 0o644
    effective = host.check_output("apt-config dump Acquire::http::Proxy")
    assert f'"{node.config.base.apt_proxy}"' in effective


def test_apt_waits_for_the_package_lock(host, spec: distros.DistroSpec) -> None:
    """apt as apt itself reads its settings (another file could override gpunode's)."""
    if spec.family != "apt":
        pytest.skip("apt distros only: dnf waits for its lock by itself")
    assert host.file(APT_LOCK_FILE).mode == 0o644
    effective = host.check_output("apt-config dump DPkg::Lock::Timeout")
    assert effective == f'DPkg::Lock::Timeout "{APT_LOCK_TIMEOUT_S}";', effective


def test_apt_sources_have_the_security_suite(host, spec: distros.DistroSpec) -> None:
    """Unattended upgrades get security updates only from a <codename>-security suite: what
    apt itself would download (`apt-get indextargets`), wherever the suite comes from."""
    if spec.family != "apt":
        pytest.skip("dnf distros: the security updates are in the distro's own repositories")
    out = host.check_output("apt-get indextargets --format '$(RELEASE)' 'Created-By: Packages'")
    assert f"{spec.codename}-security" in out.split(), out


def test_admin_users(host, node: Host) -> None:
    group = node.config.base.admin_group
    assert host.group(group).exists
    for admin in node.config.base.admin_users:
        user = host.user(admin.name)
        assert user.exists, admin.name
        assert user.shell == admin.shell
        assert (group in user.groups) == admin.sudo
        keys = host.file(f"{user.home}/.ssh/authorized_keys")
        assert keys.user == admin.name and keys.mode == 0o600
        assert sorted(keys.content_string.split("\n")) == sorted(
            [*admin.ssh_keys, ""] if keys.content_string.endswith("\n") else admin.ssh_keys
        )


def test_sudoers_valid_and_strict(host, node: Host) -> None:
    sudoers = host.file("/etc/sudoers.d/90-gpunode-admins")
    assert (sudoers.user, sudoers.group, sudoers.mode) == ("root", "root", 0o440)
    assert f"%{node.config.base.admin_group} ALL=(ALL:ALL)" in sudoers.content_string
    assert host.run("visudo -c").rc == 0


def test_admin_sudo_works(host, node: Host) -> None:
    for admin in node.config.base.admin_users:
        if admin.sudo and node.config.base.sudo_nopasswd:
            out = host.run(f"runuser -u {admin.name} -- sudo -n id -u")
            assert out.rc == 0 and out.stdout.strip() == "0", out.stderr


def test_journald_limits(host, node: Host) -> None:
    conf = host.file("/etc/systemd/journald.conf.d/50-gpunode.conf")
    assert f"SystemMaxUse={node.config.base.journald.system_max_use}" in conf.content_string
    assert host.service("systemd-journald").is_running
    assert host.file("/var/log/journal").is_directory


def test_chrony(host, node: Host, spec: distros.DistroSpec, in_container: bool) -> None:
    conf = host.file(spec.chrony_conf).content_string
    for server in node.config.base.ntp_servers:
        assert f" {server} iburst" in conf
    service = host.service(spec.chrony_service)
    assert service.is_enabled
    if not in_container:
        assert service.is_running


def test_auto_updates_never_touch_held_packages(host, node: Host, spec: distros.DistroSpec) -> None:
    hold = hold_patterns(node.config, spec.family)
    if spec.family == "apt":
        dump = host.check_output("apt-config dump Unattended-Upgrade::Package-Blacklist")
        for pattern in hold:
            assert f'"{pattern}"' in dump, pattern
        periodic = host.check_output("apt-config dump APT::Periodic::Unattended-Upgrade")
        enabled = "1" if node.config.base.auto_updates.enabled else "0"
        assert f'APT::Periodic::Unattended-Upgrade "{enabled}";' in periodic
    else:
        conf = host.file("/etc/dnf/automatic.conf").content_string
        assert f"excludepkgs = {' '.join(hold)}" in conf
        assert (
            host.service("dnf-automatic.timer").is_enabled == node.config.base.auto_updates.enabled
        )
