"""pyinfra facts for the GPU stack: one cheap shell command each.

.. code:: python

    from gpunode.facts.nvidia import NvidiaHost
    state = host.get_fact(NvidiaHost)
    state["gpus"], state["nvswitches"], state["loaded"]
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable
from typing import Any

from pyinfra.api import FactBase

from gpunode import probe

# PCI class codes (sysfs "class"): 0x03xxxx display controllers (a GPU: VGA 0x0300,
# 3D 0x0302); 0x0680xx "other bridge", which NVIDIA's NVSwitches are (lspci: "Bridge [0680]").
GPU_CLASS_PREFIX = "0x03"
NVSWITCH_CLASS_PREFIX = "0x0680"


class NvidiaHost(FactBase):
    """
    What the GPU stack needs to know about a host, from one shell command: its NVIDIA
    PCI devices (sysfs, vendor 0x10de: no pciutils needed), NVSwitches (those, or
    /proc/driver/nvidia-nvswitch/devices once the driver runs), the loaded driver
    (/sys/module/nvidia/version), the module on disk for the running kernel
    (``modinfo``), Secure Boot (``mokutil --sb-state``), the running kernel and whether
    the host is a container.

    .. code:: python

        {
            "gpus": ["0000:1b:00.0 0x2330"],
            "nvswitches": 4,
            "loaded": "580.95.05",      # "" when no NVIDIA module is loaded
            "on_disk": "580.95.05",     # "" when no module is built for this kernel
            "secure_boot": False,       # None: unknown (no mokutil or no EFI)
            "kernel": "6.8.0-45-generic",
            "container": "",            # e.g. "systemd-nspawn"
        }
    """

    @staticmethod
    def default() -> dict:  # no output at all: nothing known, no NVIDIA device
        return NvidiaHost().process([])

    def command(self) -> str:
        return (
            'echo "kernel=$(uname -r)"; '
            'echo "container=$(systemd-detect-virt --container 2>/dev/null)"; '
            'v=; read -r v 2>/dev/null < /sys/module/nvidia/version; echo "loaded=$v"; '
            'echo "on_disk=$(modinfo -F version nvidia 2>/dev/null)"; '
            'echo "secure_boot=$(mokutil --sb-state 2>/dev/null | head -n 1)"; '
            'echo "procfs_nvswitches=$(ls /proc/driver/nvidia-nvswitch/devices 2>/dev/null '
            '| wc -l)"; '
            # the shell's own `read`, not `$(cat ...)`: a server has hundreds of PCI
            # devices, and a fork per file read cost about 1 ms each
            "for d in /sys/bus/pci/devices/*; do "
            'v=; read -r v 2>/dev/null < "$d/vendor"; [ "$v" = 0x10de ] || continue; '
            'c=; i=; read -r c < "$d/class"; read -r i < "$d/device"; '
            'echo "pci=${d##*/} $c $i"; done; true'
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
                parts = value.split()
                if len(parts) != 3:
                    continue
                address, pci_class, device = parts
                if pci_class.startswith(GPU_CLASS_PREFIX):
                    gpus.append(f"{address} {device}")
                elif pci_class.startswith(NVSWITCH_CLASS_PREFIX):
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

    default = list

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

    default = dict

    def command(self, module: str) -> str:
        return f"cat {shlex.quote(f'/etc/dnf/modules.d/{module}.module')} 2>/dev/null || true"

    def process(self, output: list[str]) -> dict[str, str]:
        out = {}
        for line in output:
            key, sep, value = line.partition("=")
            if sep and not line.startswith("["):
                out[key.strip()] = value.strip()
        return out


class NvidiaGpuMinors(FactBase):
    """
    GPU UUID -> device minor (``/dev/nvidia<minor>``), from the driver's
    ``/proc/driver/nvidia/gpus/*/information`` files; ``{}`` without the driver.

    .. code:: python

        {"GPU-9221d5d1-b60b-a624-bf14-0a1819cfda3b": 5}
    """

    @staticmethod
    def default() -> dict[str, int]:
        return {}

    def command(self) -> str:
        return (
            'for f in /proc/driver/nvidia/gpus/*/information; do [ -r "$f" ] && '
            "grep -E '^(GPU UUID|Device Minor):' \"$f\"; done; true"
        )

    def process(self, output: list[str]) -> dict[str, int]:
        minors: dict[str, int] = {}
        uuid = None
        for line in output:
            key, _, value = line.partition(":")
            if key.strip() == "GPU UUID":
                uuid = value.strip()
            elif key.strip() == "Device Minor" and uuid:
                minors[uuid] = int(value.strip())
                uuid = None
        return minors


class GpuProbe(FactBase):
    """
    The node's GPUs and their health: the JSON report of ``gpunode-probe`` (one command
    per host; gpunode/probe.py documents the schema and exit codes). Before the probe is
    installed: status ``not_installed`` and the NVIDIA GPUs on the PCI bus.

    .. code:: python

        {"status": "healthy", "exit_code": 0, "gpu_count": 1, "driver_version": "580.95.05",
         "gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", ...}], ...}
        {"status": "no_gpu", "exit_code": 2, "gpu_count": 0, "gpus": [], "pci_gpus": [], ...}
        {"status": "not_installed", "exit_code": None, "pci_gpus": ["0000:01:00.0"], ...}
    """

    def command(self) -> str:
        return probe.FACT_COMMAND.format(probe=probe.PROBE_PATH)

    def process(self, output: list[str]) -> dict[str, Any]:
        return parse_probe_output(output)


def parse_probe_output(output: list[str]) -> dict[str, Any]:
    """The fact's output lines -> a probe report.

    A probe that prints no JSON (python3 missing, a crash) gives status ``probe_failed``
    and its exit code, so callers never mistake it for a GPU-less host."""
    lines = [line for line in output if line.strip()]
    exit_line = lines[-1] if lines else ""
    _, sep, code = exit_line.partition("gpunode-probe-exit=")
    if not sep:
        raise ValueError(f"gpunode-probe fact: unexpected output {output!r}")
    if code == "not-installed":
        pci = [line.partition("=")[2] for line in lines if line.startswith("pci-gpu=")]
        return {**probe.empty_report(), "status": "not_installed", "pci_gpus": pci}
    body = "\n".join(lines[:-1])
    try:
        report: dict[str, Any] = json.loads(body)
    except ValueError:
        report = {
            **probe.empty_report(),
            "status": "probe_failed",
            "error": f"gpunode-probe printed no JSON: {body[-500:]!r}",
        }
    report["exit_code"] = int(code)
    return report
