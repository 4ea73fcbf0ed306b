"""VM tests (`sudo make test-vm`, issue 16): what containers cannot reach, on the Vagrant lab's
real VMs (docs/lab.md, "On this machine"): their own kernel, their own boot.

The tests use the VM lab `gpunode vm-lab up` makes (libvirt, the box built here, two Debian 12
VMs under KVM or QEMU's software emulation). A lab that is already up is used as it is and left
up; one these tests started is taken down at the end (GPUNODE_VM_KEEP=1 keeps it). They need
root: under CI=true they fail rather than skip without it.

Each VM is converged once per session (`pyinfra -y --sudo inventories/vagrant.py
deploys/gpu_node.py`); the measured times are printed at the end of the run.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

# the lab tests' helpers: a subprocess with the seal off and stdin closed, pyinfra's totals
from lab.conftest import IN_CI, changes, run  # noqa: F401  (changes: re-exported to the tests)

from gpunode.commands.drift import bookkeeping
from gpunode.commands.vmlab import VAGRANT_INVENTORY, VmLabSettings, _load_state, status
from gpunode.config import read_yaml
from gpunode.inventory import load_inventory_file
from gpunode.paths import REPO_ROOT
from gpunode.schema.node import NodeConfig

INVENTORY = "inventories/vagrant.py"
DEPLOY = "deploys/gpu_node.py"
FIGURES: list[tuple[str, str]] = []  # (what, measured): printed at the end of the run


def figure(what: str, seconds: float) -> None:
    FIGURES.append((what, f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("VM lab: measured")
        for what, measured in FIGURES:
            terminalreporter.write_line(f"{what}: {measured}")


def pytest_collection_modifyitems(items: list[Any]) -> None:
    """The NVIDIA driver's tests last: its DKMS build is most of a run under software
    emulation, and the quicker checks report first (the sort keeps every other order)."""
    items.sort(key=lambda item: item.path.name == "test_nvidia_driver.py")


def require_root() -> None:
    if os.geteuid() == 0:
        return
    if IN_CI:
        pytest.fail("VM tests need root and CI=true: refusing to skip them")
    pytest.skip("VM tests need root (libvirt's system instance, the box build)")


@dataclass
class VmLab:
    settings: VmLabSettings
    hosts: dict[str, str]  # inventory name -> address on the private network
    key: Path
    data: list[Path] = field(default_factory=list)

    def known_hosts(self, host: str) -> Path:
        return REPO_ROOT / ".vagrant" / "machines" / host / "libvirt" / "known_hosts"

    def ssh(
        self, host: str, command: str, *, timeout: float = 300, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """``command`` as root on ``host`` (the vagrant login, then sudo), over the private
        network, with the host key pyinfra recorded."""
        argv = [
            "ssh",
            "-i", str(self.key),
            "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=10",
            "-o", "StrictHostKeyChecking=accept-new",
            "-o", f"UserKnownHostsFile={self.known_hosts(host)}",
            f"vagrant@{self.hosts[host]}",
            "sudo -n sh -c " + shlex.quote(command),
        ]  # fmt: skip
        return run(argv, timeout=timeout, check=check)

    def answers(self, host: str) -> bool:
        try:
            return self.ssh(host, "true", timeout=30).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def boot_id(self, host: str) -> str:
        return self.ssh(host, "cat /proc/sys/kernel/random/boot_id", check=True).stdout.strip()

    def config(self, host: str, inventory: str = INVENTORY) -> NodeConfig:
        """The node's settings as the deploy sees them (the inventory file, loaded)."""
        return load_inventory_file(str(REPO_ROOT / inventory)).hosts[host].config

    def reboot(self, host: str, timeout: float = 900) -> float:
        """Reboot ``host`` and wait until it answers over SSH with a new boot id; seconds."""
        before = self.boot_id(host)
        started = time.monotonic()
        # the reboot may cut the connection before ssh returns: its exit status says nothing
        self.ssh(host, "systemd-run --on-active=1 --timer-property=AccuracySec=100ms "
                 "systemctl reboot", timeout=60)  # fmt: skip
        while True:
            time.sleep(5)
            if self.answers(host) and self.boot_id(host) != before:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                pytest.fail(f"{host} did not come back within {timeout:.0f} s of a reboot")

    def inventory_with(self, name: str, defaults: dict[str, Any]) -> tuple[str, dict]:
        """inventories/vagrant.py over a copy of vagrant.yml with ``defaults`` merged into its
        defaults (one level deep): (the inventory's path, the environment pyinfra needs).

        The copy lives in the VM lab's own folder, not under pytest's temporary folder: a
        test here runs for up to hours, and every other pytest run on the machine removes
        all but the newest three of those folders when it starts."""
        doc = read_yaml(VAGRANT_INVENTORY)
        for key, value in defaults.items():
            if isinstance(value, dict):
                doc["defaults"].setdefault(key, {}).update(value)
            else:
                doc["defaults"][key] = value
        folder = self.settings.state_dir / "tests" / name / "inventories"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        shutil.copy(REPO_ROOT / INVENTORY, folder / "vagrant.py")
        (folder / "vagrant.yml").write_text(yaml.safe_dump(doc))
        # the copy finds the VMs' key, known_hosts and the lab's proxy where the lab keeps them
        env = {
            "VAGRANT_DOTFILE_PATH": str(REPO_ROOT / ".vagrant"),
            "GPUNODE_VM_LAB_DIR": str(self.settings.state_dir),
        }
        return str(folder / "vagrant.py"), env


def changed_ops(output: str) -> tuple[list[str], list[str]]:
    """(operations that changed something, the bookkeeping ones among them: the seal and
    AIDE's database, which follow any change and are never drift) from pyinfra's results
    table; an operation's "Success" column counts the hosts where it ran commands."""
    lines = output.splitlines()
    header = next(
        i for i, line in enumerate(lines) if line.split()[:3] == ["Operation", "Hosts", "Success"]
    )
    changed = []
    for line in lines[header + 1 :]:
        cells = [c for c in line.strip().split("  ") if c.strip()]
        if cells and cells[0].strip() == "Grand total":
            break
        if len(cells) == 5 and cells[2].strip() != "-":
            changed.append(cells[0].strip())
    return changed, [op for op in changed if bookkeeping(op)]


def pyinfra_sudo(
    *args: str, env: dict[str, str] | None = None, timeout: float = 3600
) -> subprocess.CompletedProcess[str]:
    """A real run (-y) as the vagrant login with sudo, as `make vm-lab` deploys."""
    return run([sys.executable, "-m", "pyinfra", "-y", "--sudo", *args], env=env, timeout=timeout)


def gpunode(*args: str, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "gpunode.commands.cli", *args], timeout=timeout)


@pytest.fixture(scope="session")
def vm_lab() -> Iterator[VmLab]:
    require_root()
    settings = VmLabSettings.from_env()
    made_here = False
    if not status(settings)[0]:
        started = time.monotonic()
        up = gpunode("vm-lab", "up")
        if up.returncode != 0:
            pytest.fail(f"the VM lab did not start:\n{up.stdout[-4000:]}\n{up.stderr[-4000:]}")
        figure("gpunode vm-lab up", time.monotonic() - started)
        made_here = True
    state = _load_state(settings)
    doc = read_yaml(VAGRANT_INVENTORY)
    hosts = {name: entry["connection"]["address"] for name, entry in doc["hosts"].items()}
    yield VmLab(settings=settings, hosts=hosts, key=Path(state["key"]))
    if made_here and os.environ.get("GPUNODE_VM_KEEP") != "1":
        gpunode("vm-lab", "down", timeout=600)


@pytest.fixture(scope="session")
def converged(vm_lab: VmLab) -> VmLab:
    """Every VM of the lab deployed once (a first deploy, or a re-run on a lab already up)."""
    started = time.monotonic()
    done = pyinfra_sudo(INVENTORY, DEPLOY)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    figure(
        f"deploy of {len(vm_lab.hosts)} VMs ({changes(out)[0]} changes)", time.monotonic() - started
    )
    return vm_lab
