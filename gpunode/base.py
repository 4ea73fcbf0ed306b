"""What the base role derives from a node's config and its distro row: the unattended-upgrade
hold list in each family's syntax, the security mirror and security source, and whether a
host runs the declared distro (roles/base.py applies them)."""

from __future__ import annotations

import re
from typing import Any

from gpunode.render import environment, ini_value
from gpunode.schema import distros
from gpunode.schema.distros import DISTROS
from gpunode.schema.node import Connection, NodeConfig
from gpunode.schema.types import ConfigError

DNF_CONF = "/etc/dnf/dnf.conf"
ADMIN_SUDOERS = "/etc/sudoers.d/90-gpunode-admins"

# gpunode's top directories on a node, made by the base role before any role puts files under
# them. Made implicitly (by `mkdir -p` or a put into a new folder) they would take the umask of
# gpunode's own session, 027 where pam_umask applies login.defs' UMASK (Ubuntu, and
# hardening.login.umask's default), and the services, which run as their own users, could not
# reach their runtimes and models. What is private under them has a mode of its own.
NODE_DIRS: dict[str, str] = {
    "/etc/gpunode": "755",
    "/var/lib/gpunode": "755",
    "/var/cache/gpunode": "755",
    "/opt/gpunode": "755",
    "/usr/local/lib/gpunode": "755",
}


# apt on a node waits for the package lock instead of failing at once: a deploy that meets
# unattended-upgrades (base.auto_updates, 06:00 to 07:00 by default) at work waits for it to end.
# dnf waits by itself. Written before the base role's first apt command.
APT_LOCK_FILE = "/etc/apt/apt.conf.d/01gpunode-lock-timeout"
APT_LOCK_TIMEOUT_S = 900


def render_apt_lock_timeout() -> str:
    return (
        "// Managed by gpunode (roles/base.py). Local changes are overwritten.\n"
        "// apt waits this long (seconds) for the dpkg lock another apt holds, then fails.\n"
        f'DPkg::Lock::Timeout "{APT_LOCK_TIMEOUT_S}";\n'
    )


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


SECURITY_LIST = "/etc/apt/sources.list.d/gpunode-security.list"
APT_COMPONENT_RE = r"[a-z0-9][a-z0-9.+-]*"


def security_source(spec: distros.DistroSpec, sources: list[dict[str, Any]]) -> str | None:
    """The content of SECURITY_LIST for a host whose other apt sources (the AptSources fact)
    have no ``<codename>-security`` suite: the distro's security archive, with the components
    the host takes from its main suite (signed by the distro's keyring); None when they have
    it (or the distro has no such archive). A component that is not a plain name (apt's own
    words) raises ValueError."""
    suite = f"{spec.codename}-security"
    # the host's own sources only: gpunode's files (this one, the NVIDIA role's non-free
    # suite, ...) come and go within a run, and would make the result differ on the next one
    others = [e for e in sources if not e["file"].rsplit("/", 1)[-1].startswith("gpunode-")]
    if not spec.apt_security_archive or any(suite in e["suites"] for e in others):
        return None
    components = list(
        dict.fromkeys(c for e in others if spec.codename in e["suites"] for c in e["components"])
    )
    bad = [c for c in components if not re.fullmatch(APT_COMPONENT_RE, c)]
    if bad:
        raise ValueError(
            f"the {spec.codename} suite in the host's apt sources has components that are not "
            f"plain names: {', '.join(repr(c) for c in bad)} (allowed: {APT_COMPONENT_RE})"
        )
    return (
        "# Managed by gpunode (roles/base.py): the distro's security updates, which the other\n"
        "# apt sources of this host do not have. Removed once they do, or with base.apt_mirror.\n"
        f"deb [signed-by={spec.apt_keyring}] {spec.apt_security_archive} {suite} "
        f"{' '.join(components or ['main'])}\n"
    )


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
