"""What the base role derives from a node's config and its distro row: the unattended-upgrade
hold list in each family's syntax, the security mirror, and whether a host runs the declared
distro (roles/base.py applies them)."""

from __future__ import annotations

from gpunode.render import environment, ini_value
from gpunode.schema import distros
from gpunode.schema.distros import DISTROS
from gpunode.schema.node import Connection, NodeConfig
from gpunode.schema.types import ConfigError

DNF_CONF = "/etc/dnf/dnf.conf"
ADMIN_SUDOERS = "/etc/sudoers.d/90-gpunode-admins"


def render_admin_sudoers(config: NodeConfig) -> str:
    """The admin group's sudoers drop-in (the group name is a checked GroupName)."""
    return (
        environment("base")
        .get_template("sudoers.j2")
        .render(admin_group=config.base.admin_group, nopasswd=config.base.sudo_nopasswd)
    )


def hold_patterns(config: NodeConfig, family: distros.Family) -> list[str]:
    """The hold list in the family's syntax.

    Entries are package-name prefixes where ``*`` matches anything. apt's
    Package-Blacklist takes regular expressions matched from the start of the
    name: ``.`` and ``+`` are bracketed (no backslashes in apt.conf strings).
    dnf's excludepkgs takes globs: a trailing ``*`` makes the prefix match.
    """
    patterns = config.base.auto_updates.hold
    if family == "apt":
        return [
            "".join(f"[{c}]" if c in ".+" else ".*" if c == "*" else c for c in p) for p in patterns
        ]
    return [p if p.endswith("*") else f"{p}*" for p in patterns]


def security_mirror(mirror: str, spec: distros.DistroSpec) -> str | None:
    if not spec.apt_security_path:
        return None
    return mirror.rstrip("/").rsplit("/", 1)[0] + "/" + spec.apt_security_path


def host_matches(spec: distros.DistroSpec, info: dict[str, str]) -> bool:
    return info["id"] in spec.os_ids and (
        info["version_id"] == spec.version_id
        or info["version_id"].startswith(spec.version_id + ".")
    )


def check_host(where: str, config: NodeConfig, connection: Connection) -> list[str]:
    """Checks that need the merged config; [] when fine."""
    problems: list[str] = []
    proxy = config.base.apt_proxy
    if proxy and config.distro and DISTROS[config.distro].family == "dnf":
        try:
            ini_value(proxy, f"{where}: base.apt_proxy ({DNF_CONF} proxy=)")
        except ConfigError as exc:
            problems.append(str(exc))
    return problems
