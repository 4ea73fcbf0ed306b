"""Issue 17: "a blacklisted module refuses to load where modules can load", for real.

This machine's kernel has no loadable modules and the lab hosts are containers, which cannot
load one. So Debian 12's own kernel (the candidate of ``linux-image-amd64``) is booted under
QEMU with software emulation (TCG; there is no KVM here), with an initramfs built by the test
(tests/unit/vmkernel.py): busybox, Debian's real kmod, the kernel's modules, and the
modprobe files gpunode renders *now* (``hardening.render_modprobe``):

* ``/etc/modprobe.d/60-gpunode-modules.conf``: a default node's file, where nodes have it;
* ``/etc/gpunode-test/allow-sctp.conf``: a node with ``hardening.allow_modules: [sctp]``;
* ``/etc/gpunode-test/none.conf``: empty, for the controls.

``/check`` runs as PID 1 and prints one ``GPUNODE-VM`` line per try on the serial console,
in this order, with gpunode's file in place: a filesystem asked for by the kernel itself
(``mount -t udf``: the kernel runs /sbin/modprobe for the alias ``fs-udf``, which the
``blacklist`` line refuses), then every module of DISABLED_MODULES this kernel has, by
``modprobe <module>`` (which the ``install <module> /bin/false`` line refuses); ``sctp`` and
``dccp`` with the allow-sctp file only (``modprobe -C``); then the controls with no
configuration at all (the kernel's own request through a /sbin/modprobe wrapper with
``-C none.conf``, then every module): the same kernel loads each of them, so a refusal above
is gpunode's file at work, not a kernel that loads nothing. Then it powers off. One boot for
all (about 10 s here); the tests read its lines.

Runs as root (the cache is /var/cache/gpunode/vmkernel); Debian's packages are fetched once.
Under CI=true a missing prerequisite (QEMU, a package) fails the tests; elsewhere they skip.
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import vmkernel
from harness import need_root

from gpunode import hardening
from gpunode.config import load
from gpunode.schema.hardening import DISABLED_MODULES
from gpunode.schema.node import NodeConfig

BOOT_TIMEOUT = 240  # seconds; the boot and every try take 10-15 s here (TCG, 1 vCPU)
MARK = "GPUNODE-VM"
GPUNODE_FILE = "/etc/modprobe.d/60-gpunode-modules.conf"  # roles/hardening.py writes it there
ALLOW_SCTP = "/etc/gpunode-test/allow-sctp.conf"
NO_CONFIG = "/etc/gpunode-test/none.conf"
AUTOLOADED_FS = "udf"
# the modules this test must be able to try: if Debian's kernel stops having one as a module,
# the test says so instead of passing on fewer
MUST_TRY = ("dccp", "sctp", AUTOLOADED_FS)

# /sbin/modprobe by its path: Debian's busybox-static runs its own applets first (a bare
# `modprobe` in its sh is busybox's, which knows neither -C nor `install`)
CHECK = r"""
PATH=/sbin:/bin
export PATH
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec 3>/dev/ttyS1
say() { echo "$MARK $*" >&3; }
loaded() { if grep -q "^$1 " /proc/modules; then echo 1; else echo 0; fi; }
said() { head -n 1 /tmp/out | tr -d '\r'; }
try() {
    kind=$1; m=$2; shift 2
    /sbin/modprobe "$@" "$m" >/tmp/out 2>&1
    rc=$?
    say "$kind module=$m rc=$rc loaded=$(loaded "$(echo "$m" | tr - _)") said=$(said)"
}
automount() {
    kind=$1; fs=$2
    mkdir -p "/mnt/$fs"
    mount -t "$fs" none "/mnt/$fs" >/tmp/out 2>&1
    rc=$?
    umount "/mnt/$fs" 2>/dev/null
    say "$kind module=$fs rc=$rc loaded=$(loaded "$fs") said=$(said)"
}
version=$(/sbin/modprobe --version | head -n 1)
say "start kernel=$(uname -r) loaded=$(wc -l < /proc/modules) modprobe=$version"
automount autoload-blocked "$FS"
for m in $MODULES; do try blocked "$m"; done
try allowed sctp -C "$ALLOW"
try allowed dccp -C "$ALLOW"
echo /sbin/modprobe-noconf > /proc/sys/kernel/modprobe
automount autoload-control "$FS"
echo /sbin/modprobe > /proc/sys/kernel/modprobe
for m in $MODULES; do try control "$m" -C "$NONE"; done
say done
poweroff -f
"""
# the kernel's own module requests (kernel.modprobe) with no configuration, for the control
MODPROBE_NOCONF = f'#!/bin/sh\nexec /sbin/modprobe -C {NO_CONFIG} "$@"\n'


def node(**hardening_data: Any) -> NodeConfig:
    raw = {
        "defaults": {
            "distro": "debian12",
            "firewall": {"enabled": False},
            "hardening": hardening_data,
        },
        "hosts": {"gpu-01": {"connection": {"address": "192.0.2.10"}}},
    }
    return load(raw, source="test_modules_vm").hosts["gpu-01"].config


@dataclass(frozen=True)
class Try:
    kind: str  # blocked, autoload-blocked, allowed, autoload-control, control
    module: str
    rc: int
    loaded: bool  # in /proc/modules afterwards
    said: str  # modprobe's (or mount's) first line of output

    def __str__(self) -> str:
        return f"{self.kind} {self.module}: rc={self.rc} loaded={self.loaded} said={self.said!r}"


@dataclass
class VmRun:
    kernel: vmkernel.Kernel
    tried: list[str]  # DISABLED_MODULES this kernel has as modules
    absent: list[str]  # DISABLED_MODULES it does not (not built, or built in)
    boot: vmkernel.Boot
    tries: list[Try]

    def get(self, kind: str, module: str) -> Try:
        found = [t for t in self.tries if (t.kind, t.module) == (kind, module)]
        assert len(found) == 1, f"no single {kind} try of {module}:\n{self.boot.tail()}"
        return found[0]


def unavailable(what: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"the module-loading VM cannot run, and CI=true: {what}")
    pytest.skip(f"the module-loading VM cannot run ({what})")


@pytest.fixture(scope="module")
def vm() -> VmRun:
    need_root("the module-loading VM (its cache is /var/cache/gpunode/vmkernel)")
    names = list(DISABLED_MODULES)
    try:
        vmkernel.qemu()
        tools = vmkernel.tools()
        kernel = vmkernel.kernel(names, tools)
    except vmkernel.Unavailable as exc:
        unavailable(str(exc))
        raise  # not reached: unavailable fails or skips
    tried = [m for m in names if kernel.has(m)]
    absent = [m for m in names if m not in tried]
    script = (
        "#!/bin/sh\n"
        + "".join(
            f"{name}={shlex.quote(value)}\n"
            for name, value in {
                "MARK": MARK,
                "MODULES": " ".join(tried),
                "FS": AUTOLOADED_FS,
                "ALLOW": ALLOW_SCTP,
                "NONE": NO_CONFIG,
            }.items()
        )
        + CHECK
    )
    files = {
        "/check": (script, 0o755),
        "/sbin/modprobe-noconf": (MODPROBE_NOCONF, 0o755),
        GPUNODE_FILE: (hardening.render_modprobe(node()), 0o644),
        ALLOW_SCTP: (hardening.render_modprobe(node(allow_modules=["sctp"])), 0o644),
        NO_CONFIG: ("", 0o644),
    }
    (vmkernel.CACHE / "work").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=vmkernel.CACHE / "work") as work:
        try:
            initramfs = vmkernel.build_initramfs(kernel, tools, tried, files, Path(work))
        except vmkernel.Unavailable as exc:
            unavailable(str(exc))
        boot = vmkernel.boot(kernel, initramfs, "/check", BOOT_TIMEOUT, Path(work))
    if boot.returncode is None:
        pytest.fail(f"the VM ran past {BOOT_TIMEOUT} s; it said:\n{boot.tail()}")
    if not re.search(rf"(?m)^{MARK} done$", boot.results):
        pytest.fail(f"the VM stopped before /check was done (QEMU exit {boot.returncode}):\n"
                    f"{boot.tail()}")  # fmt: skip
    tries = [
        Try(m["kind"], m["module"], int(m["rc"]), m["loaded"] == "1", m["said"].strip())
        for m in re.finditer(
            rf"(?m){MARK} (?P<kind>\S+) module=(?P<module>\S+) rc=(?P<rc>\d+) "
            r"loaded=(?P<loaded>[01]) said=(?P<said>.*)$",
            boot.results,
        )
    ]
    print(
        f"\nVM: {kernel.package} {kernel.package_version} ({kernel.version}), "
        f"boot and tries in {boot.seconds:.0f} s; tried {tried}, absent {absent}"
    )
    return VmRun(kernel, tried, absent, boot, tries)


def test_the_vm_ran_debians_kernel_with_nothing_loaded(vm: VmRun) -> None:
    start = re.search(
        rf"(?m)^{MARK} start kernel=(\S+) loaded=(\d+) modprobe=(.*)$", vm.boot.results
    )
    assert start, vm.boot.tail()
    assert start[1] == vm.kernel.version
    assert start[2] == "0"  # so "loaded" afterwards is each try's doing
    assert start[3].startswith("kmod version "), start[3]  # Debian's, not busybox's modprobe
    for module in MUST_TRY:
        assert module in vm.tried, f"{vm.kernel.version} has no {module} module to try"


def test_every_disabled_module_refuses_to_load(vm: VmRun) -> None:
    """modprobe <module> with gpunode's file in /etc/modprobe.d: refused, not loaded."""
    for module in vm.tried:
        tried = vm.get("blocked", module)
        assert tried.rc != 0 and not tried.loaded, tried


def test_the_kernel_does_not_load_a_disabled_filesystem_on_its_own(vm: VmRun) -> None:
    """mount -t udf: the kernel asks /sbin/modprobe for fs-udf (an alias), gpunode's file
    refuses it; with no configuration the same request loads it."""
    blocked = vm.get("autoload-blocked", AUTOLOADED_FS)
    assert not blocked.loaded, blocked
    control = vm.get("autoload-control", AUTOLOADED_FS)
    assert control.loaded, control


def test_the_same_kernel_loads_each_of_them_without_gpunodes_file(vm: VmRun) -> None:
    """The control: a refusal above is gpunode's file at work, not a kernel that cannot
    load modules (or has not got that one)."""
    for module in vm.tried:
        control = vm.get("control", module)
        assert control.rc == 0 and control.loaded, control


def test_allow_modules_lets_just_that_module_load(vm: VmRun) -> None:
    """hardening.allow_modules: [sctp]: sctp loads, dccp is still refused."""
    sctp = vm.get("allowed", "sctp")
    assert sctp.rc == 0 and sctp.loaded, sctp
    dccp = vm.get("allowed", "dccp")
    assert dccp.rc != 0 and not dccp.loaded, dccp
