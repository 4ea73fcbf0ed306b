"""Every sandboxing directive of the inference units, each one checked by systemd itself.

The units are the ones test_inference.py renders (its ``unit_text``: a CPU service, chat
with llama.cpp, and two GPU ones, big with vLLM and vision with Triton). For each kind:

* the rendered ``[Service]`` carries exactly the sandboxing lines below, with their values;
* the overall exposure ``systemd-analyze security --offline=true`` prints for the whole unit
  is pinned to the figure measured (docs/inference.md; test_inference.py's threshold);
* dropping any single line that systemd scores raises the exposure of the checks systemd
  reports it under (``--json=short``), and, where that moves the one-decimal overall
  figure, the overall exposure too (``Directive.rises``). So no directive can go unnoticed,
  even one whose weight is too small to move the overall figure.

Lines systemd does not score (defaults restated, allowances such as ``ReadWritePaths=``,
``SystemCallErrorNumber=``) are checked for presence and value only; the allow-list form of
``SystemCallFilter=`` is checked through the descriptions systemd gives its checks.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_inference import unit_text

# unit -> kind, and the exposure systemd-analyze 252 (Debian 12) prints for it
UNITS = {"chat": "cpu", "big": "gpu", "vision": "gpu"}
MEASURED = {"chat": 1.2, "big": 1.7, "vision": 1.7}
CTL = "/dev/nvidiactl"
DEVICES = {
    "big": ["/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia5", "/dev/nvidia6", CTL],
    "vision": ["/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia0", CTL],
}
CPU, GPU = frozenset({"cpu"}), frozenset({"gpu"})
BOTH = CPU | GPU
SYSCALLS_DENIED = (
    "~@privileged @resources @mount @swap @reboot @raw-io @module @obsolete @debug "
    "@cpu-emulation @clock"
)


@dataclass(frozen=True)
class Directive:
    """One sandboxing line of the unit."""

    line: str  # as rendered; {name} is the service's name
    kinds: frozenset[str]  # the units that carry it
    checks: tuple[str, ...] = ()  # systemd-analyze's checks it lowers; () when unscored
    rises: frozenset[str] = frozenset()  # kinds whose overall exposure dropping it raises


# In the order the template renders them (gpunode's templates/inference/service.j2).
DIRECTIVES = [
    Directive("User=gpunode-{name}", BOTH, ("User=/DynamicUser=",), BOTH),
    Directive("UMask=0077", BOTH, ("UMask=",)),
    Directive("NoNewPrivileges=yes", BOTH, ("NoNewPrivileges=",), BOTH),
    Directive("CapabilityBoundingSet=", BOTH, ("CapabilityBoundingSet=~CAP_SYS_ADMIN",), BOTH),
    Directive("AmbientCapabilities=", BOTH),
    Directive("ProtectSystem=strict", BOTH, ("ProtectSystem=",), BOTH),
    Directive("ProtectHome=yes", BOTH, ("ProtectHome=",), BOTH),
    Directive("PrivateTmp=yes", BOTH, ("PrivateTmp=",), BOTH),
    Directive("ReadWritePaths=/var/cache/gpunode/inference/{name}", BOTH),
    Directive("PrivateDevices=yes", CPU, ("PrivateDevices=",), CPU),
    Directive("ProcSubset=pid", CPU, ("ProcSubset=",)),
    Directive("PrivateUsers=yes", CPU, ("PrivateUsers=",), CPU),
    Directive("PrivateDevices=no", GPU),
    Directive("DevicePolicy=closed", GPU, ("DeviceAllow=",)),
    Directive("DeviceAllow={device} rw", GPU),  # one line per device of the unit
    Directive("ProcSubset=all", GPU),
    Directive("ProtectProc=invisible", BOTH, ("ProtectProc=",), BOTH),
    Directive("ProtectClock=yes", BOTH, ("ProtectClock=",), BOTH),
    Directive("ProtectHostname=yes", BOTH, ("ProtectHostname=",)),
    Directive("ProtectKernelTunables=yes", BOTH, ("ProtectKernelTunables=",), BOTH),
    Directive("ProtectKernelModules=yes", BOTH, ("ProtectKernelModules=",), BOTH),
    Directive("ProtectKernelLogs=yes", BOTH, ("ProtectKernelLogs=",), BOTH),
    Directive("ProtectControlGroups=yes", BOTH, ("ProtectControlGroups=",), BOTH),
    Directive("RestrictNamespaces=yes", BOTH, ("RestrictNamespaces=~user",), BOTH),
    Directive("RestrictRealtime=yes", BOTH, ("RestrictRealtime=",), CPU),
    Directive("RestrictSUIDSGID=yes", BOTH, ("RestrictSUIDSGID=",), BOTH),
    Directive("LockPersonality=yes", BOTH, ("LockPersonality=",), CPU),
    Directive("RemoveIPC=yes", BOTH, ("RemoveIPC=",), CPU),
    Directive("KeyringMode=private", BOTH),
    Directive("MemoryDenyWriteExecute=yes", CPU, ("MemoryDenyWriteExecute=",), CPU),
    Directive(
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        CPU,
        ("RestrictAddressFamilies=~AF_PACKET", "RestrictAddressFamilies=~AF_NETLINK"),
        CPU,
    ),
    Directive(
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        GPU,
        ("RestrictAddressFamilies=~AF_PACKET", "RestrictAddressFamilies=~…"),
        GPU,
    ),
    Directive("SystemCallArchitectures=native", BOTH, ("SystemCallArchitectures=",), BOTH),
    Directive("SystemCallFilter=@system-service", BOTH),
    Directive(
        f"SystemCallFilter={SYSCALLS_DENIED}",
        BOTH,
        ("SystemCallFilter=~@privileged", "SystemCallFilter=~@resources"),
        BOTH,
    ),
    Directive("SystemCallErrorNumber=EPERM", BOTH),
]
# [Service] lines that are not sandboxing: what the service runs and its resource limits
NOT_SANDBOX = {
    "Type", "Group", "EnvironmentFile", "Environment", "ExecStartPre", "ExecStart",
    "WorkingDirectory", "Restart", "RestartSec", "TimeoutStartSec", "TimeoutStopSec",
    "MemoryMax", "LimitMEMLOCK", "LimitNOFILE",
}  # fmt: skip


def expected_lines(name: str) -> list[str]:
    lines = []
    for directive in DIRECTIVES:
        if UNITS[name] not in directive.kinds:
            continue
        if "{device}" in directive.line:
            lines += [directive.line.format(device=d) for d in DEVICES[name]]
        else:
            lines.append(directive.line.format(name=name))
    return lines


def sandbox_lines(text: str) -> list[str]:
    """The [Service] section's sandboxing lines, in order."""
    service = re.search(r"^\[Service\]\n(.*?)^\[", text, re.M | re.S)
    assert service, text
    return [
        line
        for line in service[1].splitlines()
        if line and not line.startswith("#") and line.split("=", 1)[0] not in NOT_SANDBOX
    ]


@dataclass(frozen=True)
class Exposure:
    overall: float  # "Overall exposure level for ...": one decimal
    checks: dict[str, float]  # check name -> its exposure (0.0: satisfied)
    descriptions: dict[str, str]


@functools.cache
def analyze(text: str) -> Exposure:
    """``systemd-analyze security --offline=true`` of a unit's text: the overall figure and,
    from ``--json=short``, each check's exposure."""
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze is missing (apt: systemd)")
    with tempfile.TemporaryDirectory() as directory:
        unit = Path(directory) / "gpunode-inference-test.service"
        unit.write_text(text)
        command = ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)]
        table = subprocess.run(command, capture_output=True, text=True, timeout=60)
        listed = subprocess.run(
            [*command, "--json=short"], capture_output=True, text=True, timeout=60
        )
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", table.stdout)
    assert score, table.stdout + table.stderr
    checks = json.loads(listed.stdout)
    return Exposure(
        overall=float(score[1]),
        checks={c["name"]: float(c["exposure"] or 0) for c in checks},
        descriptions={c["name"]: c["description"] for c in checks},
    )


def dropped(text: str, line: str) -> str:
    """The unit without one line (which it must carry exactly once)."""
    assert text.count(f"\n{line}\n") == 1, line
    return text.replace(f"\n{line}\n", "\n", 1)


@pytest.mark.parametrize("name", sorted(UNITS))
def test_the_unit_carries_exactly_the_sandboxing_lines(name: str) -> None:
    """No directive missing, none with another value, none added unreviewed (a new
    sandboxing line goes into DIRECTIVES, and so gets its own checks below)."""
    assert sandbox_lines(unit_text(name)) == expected_lines(name)


PRESENT = [
    pytest.param(name, line, id=f"{name}:{line.split(' @')[0]}")
    for name in sorted(UNITS)
    for line in expected_lines(name)
]


@pytest.mark.parametrize(("name", "line"), PRESENT)
def test_each_directive_is_rendered_once_with_its_value(name: str, line: str) -> None:
    key = line.split("=", 1)[0]
    text = unit_text(name)
    assert f"\n{line}\n" in text
    assert [x for x in sandbox_lines(text) if x.startswith(f"{key}=")] == [
        x for x in expected_lines(name) if x.startswith(f"{key}=")
    ]


@pytest.mark.parametrize("name", sorted(UNITS))
def test_the_exposure_of_the_whole_unit_is_the_measured_figure(name: str) -> None:
    exposure = analyze(unit_text(name)).overall
    print(f"{name} ({UNITS[name]}): exposure {exposure}")
    assert abs(exposure - MEASURED[name]) < 0.05, exposure


SCORED = [
    pytest.param(name, d, id=f"{name}:{d.line.split(' @')[0].format(name=name)}")
    for name in sorted(UNITS)
    for d in DIRECTIVES
    if UNITS[name] in d.kinds and d.checks
]


@pytest.mark.parametrize(("name", "directive"), SCORED)
def test_dropping_a_directive_raises_the_exposure(name: str, directive: Directive) -> None:
    text = unit_text(name)
    line = directive.line.format(name=name)
    full, without = analyze(text), analyze(dropped(text, line))
    for check in directive.checks:
        assert without.checks[check] > full.checks[check], check
    if UNITS[name] in directive.rises:
        assert without.overall > full.overall
    else:  # its checks weigh too little to move the one-decimal overall figure (measured)
        assert without.overall >= full.overall


def test_the_system_call_filter_is_an_allow_list() -> None:
    """`SystemCallFilter=@system-service` scores nothing by itself (the deny line blocks the
    groups systemd checks): dropping it turns the filter into a deny list, which systemd
    says in its checks' descriptions."""
    text = unit_text("chat")
    full = analyze(text)
    without = analyze(dropped(text, "SystemCallFilter=@system-service"))
    name = "SystemCallFilter=~@privileged"
    assert full.descriptions[name].startswith("System call allow list defined for service")
    assert without.descriptions[name].startswith("System call deny list defined for service")
