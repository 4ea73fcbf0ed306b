"""``base:``: hostname, package sources, admin users, journald, NTP and automatic updates
(roles/base.py)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from gpunode.schema.types import (
    PACKAGE_USERS,
    SERVICE_USER_PREFIX,
    GroupName,
    HoldPattern,
    HostName,
    HttpUrl,
    Model,
    NtpServer,
    PackageName,
    Retention,
    Size,
    SshPublicKey,
    UserName,
    listed_twice,
    system_group,
    system_user,
)

# Patterns that unattended upgrades must never touch: a kernel or NVIDIA update
# that lands without the matching module is the classic "NVML driver/library
# version mismatch". Entries are package-name prefixes where `*` matches
# anything; roles/base.py hold_patterns() writes them as apt Package-Blacklist
# regular expressions or dnf excludepkgs globs.
DEFAULT_HOLD = (
    "linux-image-",
    "linux-headers-",
    "linux-modules-",
    "kernel",
    "nvidia-",
    "libnvidia-",
    "cuda-",
    "libcudnn",
    "datacenter-gpu-manager",
)

DEFAULT_NTP = ("0.pool.ntp.org", "1.pool.ntp.org", "2.pool.ntp.org")


class AdminUser(Model):
    """A person who administers the node: a login with SSH keys, in the admin group."""

    name: UserName
    """The login name (not root)."""
    ssh_keys: list[SshPublicKey] = Field(default_factory=list)
    """Public keys, one `authorized_keys` line each (`ssh-...`, `ecdsa-...`, `sk-...`): the
    only keys left in `authorized_keys`."""
    sudo: bool = True
    """Member of `base.admin_group`, so allowed to sudo."""
    shell: Literal["/bin/bash", "/bin/sh", "/usr/bin/zsh"] = "/bin/bash"
    """The login shell."""

    @field_validator("name")
    @classmethod
    def _not_root(cls, value: str) -> str:
        if value == "root":
            raise ValueError("root is not an admin user gpunode manages (allowed: any other name)")
        if system_user(value) or value in PACKAGE_USERS:
            raise ValueError(
                f"{value!r} is a system account or the user of a package gpunode installs "
                "(gpunode/schema/types.py SYSTEM_USERS, PACKAGE_USERS; allowed: a person's "
                "login name, not starting with 'systemd-' or '_')"
            )
        if value.startswith(SERVICE_USER_PREFIX):
            raise ValueError(
                f"{value!r}: {SERVICE_USER_PREFIX}<name> is the user of inference service <name> "
                f"(allowed: a name not starting with {SERVICE_USER_PREFIX!r})"
            )
        return value


class Journald(Model):
    """The persistent journal's bounds."""

    system_max_use: Size = "2G"
    """The most disk space the journal uses (journald's `SystemMaxUse=`)."""
    max_retention_sec: Retention = "1month"
    """Journal entries older than this are removed (journald's `MaxRetentionSec=`)."""
    rate_limit_burst: Annotated[int, Field(ge=0)] = 10000
    """Messages a service may log per interval before journald drops the rest (journald's
    `RateLimitBurst=`; 0: no rate limit)."""


class AutoUpdates(Model):
    """Unattended upgrades (apt) / dnf-automatic."""

    enabled: bool = True
    """Automatic upgrades on: unattended-upgrades (apt) or the dnf-automatic timer (dnf)."""
    hold: list[HoldPattern] = Field(default_factory=lambda: list(DEFAULT_HOLD))
    """Packages (patterns) automatic upgrades never touch; see DEFAULT_HOLD. Entries are
    package-name prefixes where `*` matches anything (apt Package-Blacklist / dnf
    excludepkgs): a kernel or NVIDIA update without its matching module breaks the GPU
    stack."""
    security_only: bool = True
    """Security updates only; false: every update from the distro's archives."""


class Base(Model):
    """What every node gets (roles/base.py)."""

    hostname: HostName | None = None
    """The system hostname; default: the inventory name, when it is a valid hostname."""
    apt_proxy: HttpUrl | None = None
    """HTTP proxy for packages (apt `Acquire::http::Proxy` / dnf.conf `proxy=`)."""
    apt_mirror: HttpUrl | None = None
    """apt distros only: base URL of a mirror of the distro archive (rewrites the distro's
    sources file, its security suite included). null: the host's own sources stay, and where
    they have no `<codename>-security` suite (a debootstrapped Debian) the distro's security
    archive is added in `/etc/apt/sources.list.d/gpunode-security.list`, with the components
    of the host's main suite, so unattended upgrades find security updates."""
    packages: list[PackageName] = Field(default_factory=list)
    """Extra packages to install."""
    ntp_servers: list[NtpServer] = Field(default_factory=lambda: list(DEFAULT_NTP), min_length=1)
    """chrony's time sources, at least one (a name containing "pool" is written as a
    `pool`)."""
    admin_users: list[AdminUser] = Field(default_factory=list)
    """The node's admin users, each name once."""
    admin_group: GroupName = "gpunode_admins"
    """The group allowed to sudo."""
    sudo_nopasswd: bool = True
    """sudo without a password: admin users log in with keys and have no password."""
    journald: Journald = Field(default_factory=Journald)
    """The persistent journal's bounds."""
    auto_updates: AutoUpdates = Field(default_factory=AutoUpdates)
    """Unattended upgrades (apt) / dnf-automatic."""

    @field_validator("admin_group")
    @classmethod
    def _own_group(cls, value: str) -> str:
        if system_group(value) and value not in ("sudo", "wheel"):
            raise ValueError(
                f"{value!r} is a system group (gpunode/schema/types.py SYSTEM_GROUPS): its "
                "members would all get sudo (allowed: a group of its own such as "
                "gpunode_admins, or sudo / wheel, which already mean 'may sudo')"
            )
        return value

    @field_validator("admin_users")
    @classmethod
    def _unique_users(cls, users: list[AdminUser]) -> list[AdminUser]:
        dupes = listed_twice(u.name for u in users)
        if dupes:
            raise ValueError(
                f"admin user listed twice: {', '.join(dupes)} (allowed: each name once)"
            )
        return users
