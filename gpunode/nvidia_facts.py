"""pyinfra facts for the GPU stack: one cheap shell command each.

.. code:: python

    from gpunode.nvidia_facts import NvidiaHost
    state = host.get_fact(NvidiaHost)
    state["gpus"], state["nvswitches"], state["loaded"]
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable

from pyinfra.api import FactBase

# `lspci -Dnn` lines of NVIDIA devices: "0000:1b:00.0 3D controller [0302]: NVIDIA
# Corporation GH100 [H100 SXM5 80GB] [10de:2330] (rev a1)". PCI class 03xx is a display
# controller (a GPU); 0680 ("Bridge", other) with vendor 10de is an NVSwitch.
_LSPCI = re.compile(r"^(?P<addr>\S+) .*\[(?P<cls>[0-9a-f]{4})\]: .*\[10de:(?P<dev>[0-9a-f]{4})\]")


class NvidiaHost(FactBase):
    """
    What the GPU stack needs to know about a host, from one shell command: its NVIDIA
    devices (``lspci -Dnn``, vendor 10de), NVSwitches (those PCI devices, or
    /proc/driver/nvidia-nvswitch/devices once the driver runs), the loaded driver
    (/sys/module/nvidia/version), the module on disk for the running kernel
    (``modinfo``), Secure Boot (``mokutil --sb-state``), the running kernel and whether
    the host is a container.

    .. code:: python

        {
            "gpus": ["0000:1b:00.0 10de:2330"],
            "nvswitches": 4,
            "loaded": "580.95.05",      # "" when no NVIDIA module is loaded
            "on_disk": "580.95.05",     # "" when no module is built for this kernel
            "secure_boot": False,       # None: unknown (no mokutil or no EFI)
            "kernel": "6.8.0-45-generic",
            "container": "",            # e.g. "systemd-nspawn"
        }
    """

    def command(self) -> str:
        return (
            'echo "kernel=$(uname -r)"; '
            'echo "container=$(systemd-detect-virt --container 2>/dev/null)"; '
            'echo "loaded=$(cat /sys/module/nvidia/version 2>/dev/null)"; '
            'echo "on_disk=$(modinfo -F version nvidia 2>/dev/null)"; '
            'echo "secure_boot=$(mokutil --sb-state 2>/dev/null | head -n 1)"; '
            'echo "procfs_nvswitches=$(ls /proc/driver/nvidia-nvswitch/devices 2>/dev/null '
            '| wc -l)"; '
            "lspci -Dnn 2>/dev/null | grep -F '[10de:' | sed 's/^/pci=/'; true"
        )

    def process(self, output: list[str]) -> dict:
        values: dict[str, str] = {}
        gpus: list[str] = []
        switches = 0
        for line in output:
            key, sep, value = line.partition("=")
            if not sep:
                continue
            if key == "pci":
                m = _LSPCI.match(value)
                if not m:
                    continue
                if m["cls"].startswith("03"):
                    gpus.append(f"{m['addr']} 10de:{m['dev']}")
                elif m["cls"] == "0680":
                    switches += 1
            else:
                values[key] = value.strip()
        sb = values.get("secure_boot", "")
        procfs = int(values.get("procfs_nvswitches") or 0)
        container = values.get("container", "")
        return {
            "gpus": gpus,
            "nvswitches": max(switches, procfs),
            "loaded": values.get("loaded", ""),
            "on_disk": values.get("on_disk", ""),
            # mokutil prints "SecureBoot enabled" / "SecureBoot disabled"; anything else
            # ("EFI variables are not supported on this system", no mokutil) is unknown.
            "secure_boot": True if sb == "SecureBoot enabled" else False if sb else None,
            "kernel": values.get("kernel", ""),
            "container": "" if container == "none" else container,
        }


def match_script(patterns: Iterable[str]) -> str:
    """A shell ``case`` that prints the names on stdin (``STATUS NAME`` or ``NAME``
    lines) that match any of the glob ``patterns``."""
    cases = "|".join(patterns)  # plain globs: [a-z0-9.+*-] only (see FAMILIES)
    if not re.fullmatch(r"[A-Za-z0-9.+*|_-]+", cases):
        raise ValueError(f"unsafe package patterns: {cases!r}")
    return f'case "$name" in {cases}) echo "$name";; esac'


def installed_matching(family: str, patterns: Iterable[str]) -> str:
    """Prints the installed packages matching ``patterns`` that are not held yet (apt), or
    all installed ones matching (dnf: its locks are compared by :class:`UnheldPackages`)."""
    case = match_script(patterns)
    if family == "apt":
        # ${db:Status-Abbrev}: "ii " installed, "hi " installed and held (dpkg-query(1))
        return (
            "dpkg-query -W -f='${db:Status-Abbrev} ${Package}\\n' 2>/dev/null | "
            f'while read -r status name; do [ "$status" = ii ] || continue; {case}; done'
        )
    return f"rpm -qa --qf '%{{NAME}}\\n' 2>/dev/null | while read -r name; do {case}; done"


DNF_VERSIONLOCK_LIST = "/etc/dnf/plugins/versionlock.list"


class UnheldPackages(FactBase):
    """
    Installed packages matching glob patterns that are not held yet: apt ``apt-mark
    hold`` (dpkg selection "hold"), dnf ``versionlock``. Empty on a converged host.

    .. code:: python

        host.get_fact(UnheldPackages, family="apt", patterns=("*nvidia*", "cuda-*"))
        ["libnvidia-ml1", "nvidia-driver"]
    """

    def command(self, family: str, patterns: tuple[str, ...]) -> str:
        installed = installed_matching(family, patterns)
        if family == "apt":
            return installed
        # versionlock.list lines: NAME-[EPOCH:]VERSION-RELEASE.* (dnf-plugins-core)
        return f"{installed}; sed 's/^/lock=/' {DNF_VERSIONLOCK_LIST} 2>/dev/null; true"

    def process(self, output: list[str]) -> list[str]:
        names, locked = set(), set()
        for line in output:
            line = line.strip()
            if line.startswith("lock="):
                entry = line[5:]
                if entry and not entry.startswith(("#", "!")):
                    locked.add(entry.rsplit("-", 2)[0])
            elif line:
                names.add(line)
        return sorted(names - locked)


class DnfModule(FactBase):
    """
    A dnf module's state file (/etc/dnf/modules.d/NAME.module) as a dict; {} when the
    module was never enabled.

    .. code:: python

        host.get_fact(DnfModule, module="nvidia-driver")
        {"name": "nvidia-driver", "stream": "580-open", "profiles": "default",
         "state": "enabled"}
    """

    def command(self, module: str) -> str:
        return f"cat {shlex.quote(f'/etc/dnf/modules.d/{module}.module')} 2>/dev/null || true"

    def process(self, output: list[str]) -> dict[str, str]:
        out = {}
        for line in output:
            key, sep, value = line.partition("=")
            if sep and not line.startswith("["):
                out[key.strip()] = value.strip()
        return out
