"""Hardening role: sshd, sysctl and OS controls to the dev-sec baselines' level.

Every value comes from ``NodeConfig.hardening`` and the tables in
gpunode/hardening.py (sshd options, sysctl keys, packages that must be absent,
files with strict modes).

- sshd: a drop-in that sorts first in ``/etc/ssh/sshd_config.d/`` (sshd takes the first
  value it reads). It is checked with ``sshd -t -f`` on its own, then in place with
  ``sshd -t``; if that fails the previous drop-in is put back and sshd is not reloaded,
  so sshd never runs (or restarts into) a broken config.
- sysctl: all keys persisted in ``/etc/sysctl.d/60-gpunode-hardening.conf``; network
  keys applied now; kernel-wide keys applied where writable (inside a container they
  are read-only: skipped with a visible notice).
- core dumps off, telnet/rsh/NIS/TFTP/inetd absent, strict modes on /etc/shadow & co.

.. code:: python

    from roles.hardening import hardening
    hardening()
"""

from __future__ import annotations

from io import StringIO

from pyinfra import host
from pyinfra.api import deploy, operation
from pyinfra.facts.files import File
from pyinfra.facts.server import Sysctl
from pyinfra.operations import apt, dnf, files, server

from gpunode import distros
from gpunode.config import NodeConfig
from gpunode.facts import HostInfo
from gpunode.hardening import (
    ABSENT_PACKAGES,
    CORE_LIMITS_FILE,
    COREDUMP_DROPIN,
    SSHD_DROPIN,
    SSHD_SERVICE,
    SSHD_STAGED,
    STRICT_FILES,
    SYSCTL_FILE,
    is_kernel_key,
    render_sshd,
    render_sysctl,
    sha1,
    sysctl_settings,
)
from gpunode.hardening_facts import SshdState, WritableSysctls
from gpunode.inventory import node_config
from gpunode.operations import fail, notice
from gpunode.paths import TEMPLATES
from roles.base import host_matches

T = TEMPLATES / "hardening"
SSHD = "/usr/sbin/sshd"


@operation()
def sysctl_values(values: dict[str, int]):
    """
    Set sysctl keys to these values now (not persisted): one ``sysctl -w`` for the keys
    whose running value differs, nothing when all match.

    .. code:: python

        sysctl_values(name="Network sysctls", values={"net.ipv4.tcp_syncookies": 1})
    """
    if not values:
        host.noop("no sysctl to set")
        return
    running = host.get_fact(Sysctl, keys=sorted(values))
    differ = {k: v for k, v in sorted(values.items()) if running.get(k) != v}
    if not differ:
        host.noop("every sysctl already has its value")
        return
    yield "sysctl -q -w " + " ".join(f"{k}={v}" for k, v in differ.items())


@operation()
def file_mode(path: str, user: str, group: str, mode: str):
    """
    Set an existing file's owner, group and mode (``000`` included, which pyinfra's
    ``files.file`` skips); a missing file is left missing.

    .. code:: python

        file_mode(name="shadow", path="/etc/shadow", user="root", group="root", mode="000")
    """
    info = host.get_fact(File, path=path)
    if not info:
        host.noop(f"{path} does not exist")
        return
    if (info["user"], info["group"]) != (user, group):
        yield f"chown {user}:{group} {path}"
    if info["mode"] != int(mode):
        yield f"chmod {mode} {path}"


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


@deploy("gpunode hardening")
def hardening() -> None:
    config = node_config(host)
    assert config.distro is not None  # guaranteed by config loading
    spec = distros.get(config.distro)
    if not host_matches(spec, host.get_fact(HostInfo)):
        return  # roles/base.py has failed this host with the reason
    if not config.hardening.enabled:
        notice(name="Hardening", message="hardening.enabled is false: skipped")
        return
    _sshd(config, spec)
    _sysctl(config)
    _core_dumps(config)
    _packages(config, spec)
    _file_modes(config, spec)


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
    wanted = render_sshd(config, str(host.data.get("ssh_user") or "root"))
    if state["dropin_sha1"] == sha1(wanted):
        return
    files.directory(name="sshd staging directory", path="/etc/gpunode/sshd", mode="700")
    files.put(name="sshd hardening (staged)", src=StringIO(wanted), dest=SSHD_STAGED, mode="600")
    server.shell(
        name="Validate and install the sshd hardening, reload sshd",
        commands=[install_sshd_command(SSHD_SERVICE[spec.family])],
    )


def _sysctl(config: NodeConfig) -> None:
    values = sysctl_settings(config)
    files.put(
        name="sysctl hardening (persisted)",
        src=StringIO(render_sysctl(config)),
        dest=SYSCTL_FILE,
        mode="644",
    )
    network = {k: v for k, v in values.items() if not is_kernel_key(k)}
    kernel = {k: v for k, v in values.items() if is_kernel_key(k)}
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
                f"{SYSCTL_FILE}, not applied"
            ),
        )


def _core_dumps(config: NodeConfig) -> None:
    if config.hardening.core_dumps:
        files.file(name="Core dump limit (none)", path=CORE_LIMITS_FILE, present=False)
        files.file(name="systemd-coredump (distro default)", path=COREDUMP_DROPIN, present=False)
        return
    files.put(
        name="Core dump limit",
        src=str(T / "core-limits.conf"),
        dest=CORE_LIMITS_FILE,
        mode="644",
    )
    files.put(
        name="systemd-coredump stores nothing",
        src=str(T / "coredump.conf"),
        dest=COREDUMP_DROPIN,
        mode="644",
    )


def _packages(config: NodeConfig, spec: distros.DistroSpec) -> None:
    if not config.hardening.remove_insecure_packages:
        return
    absent = list(ABSENT_PACKAGES[spec.family])
    if spec.family == "apt":
        apt.packages(name="Insecure legacy services absent", packages=absent, present=False)
    else:
        dnf.packages(name="Insecure legacy services absent", packages=absent, present=False)


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
