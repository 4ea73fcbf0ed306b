"""Operation tests of the GPU stack roles (roles/nvidia_driver.py, roles/cuda.py).

NVIDIA's repositories cannot be reached here and the machines have no GPU, so each test
runs the roles through pyinfra's real API against one ``@fake`` host (the machinery of
tests/unit/harness.py) for every distro x {open, proprietary} x {NVSwitch, none},
and asserts the exact repository files, keys, packages, holds, services and reboots.

What the fake host answers (fixtures/nvidia/README.md says where each came from):

* ``NvidiaHost`` (the GPU fact): its real command, run by ``sh`` here against a sysfs
  tree built from recorded ``lspci -Dnn`` output (``vendor``/``device``/``class`` per
  device), with stubs for ``uname``, ``modinfo``, ``mokutil`` and
  ``systemd-detect-virt`` on PATH; or the output recorded on a lab host.
* A converged host (``converged_host``): the files a previous run uploaded, the packages
  it installed (``dpkg -l`` / ``rpm -qa`` lines), services enabled and running, every
  NVIDIA package held, and the loaded driver equal to the one on disk.
* Everything else succeeds with no output: a fresh host.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from gpgkeys import Keyrings, make_keyrings, run_real
from harness import (
    Handler,
    Response,
    Run,
    booting,
    content_lines,
    converged,
    fake_clock,
    run_deploys,
)
from pyinfra.api import State

import gpunode.operations.server as server_ops
from gpunode import nvidia as nv
from gpunode.config import load
from gpunode.facts.nvidia import DnfModule, NvidiaHost, UnheldPackages
from gpunode.operations.packages import apt_update_command
from gpunode.schema.node import NodeConfig
from gpunode.schema.types import ConfigError
from roles.cuda import cuda
from roles.nvidia_driver import nvidia_driver

FIXTURES = Path(__file__).parent / "fixtures" / "nvidia"
HGX = FIXTURES / "lspci-Dnn-hgx-h100.txt"  # 8 H100 + 4 NVSwitch
VM = FIXTURES / "lspci-Dnn-h100-vm.txt"  # 4 H100, no NVSwitch
H100_LOADED = (
    (Path(__file__).parent / "fixtures/gpu/nvidia-h100-80gb-hbm3/sys-module-nvidia-version.out")
    .read_text()
    .strip()
)  # 580.159.04, recorded on a real H100

HOST = "gpu-01"
APT = ("debian12", "ubuntu2204", "ubuntu2404")
DNF = ("rhel9", "rocky9", "alma9")
ALL = APT + DNF
KERNEL = {  # a kernel release each distro ships (uname -r)
    "debian12": "6.1.0-28-amd64",
    "ubuntu2204": "5.15.0-119-generic",
    "ubuntu2404": "6.8.0-45-generic",
    "rhel9": "5.14.0-427.13.1.el9_4.x86_64",
    "rocky9": "5.14.0-427.13.1.el9_4.x86_64",
    "alma9": "5.14.0-427.13.1.el9_4.x86_64",
}
NVIDIA_SITE = "https://developer.download.nvidia.com/compute"
CTK_SITE = "https://nvidia.github.io/libnvidia-container"

# Written out by hand (not read from gpunode/nvidia.py), so a wrong table row fails here.
CUDA_REPO_DIR = {
    "debian12": "debian12",
    "ubuntu2204": "ubuntu2204",
    "ubuntu2404": "ubuntu2404",
    "rhel9": "rhel9",
    "rocky9": "rhel9",
    "alma9": "rhel9",
}
APT_DRIVER = {"open": {"nvidia-open-580"}, "proprietary": {"cuda-drivers-580"}}
APT_FABRIC = {"nvidia-fabricmanager-580", "libnvidia-nscq-580"}
DNF_FABRIC = {"nvidia-fabric-manager", "libnvidia-nscq"}
DNF_STREAM = {"open": "580-open", "proprietary": "580-dkms"}
APT_HOLD = "*nvidia*|libcuda*|libnvcuvid*|libnvoptix*|cuda-*|libcudnn*|datacenter-gpu-manager*"
DNF_HOLD = "*nvidia*|cuda-*|libcudnn*|datacenter-gpu-manager*"
CTK = (
    "nvidia-container-toolkit",
    "nvidia-container-toolkit-base",
    "libnvidia-container-tools",
    "libnvidia-container1",
)


# --- the GPU fact, for real, against recorded devices ------------------------------------------


def _sysfs_from_lspci(lspci: Path, root: Path) -> None:
    """The sysfs files the kernel shows for each device of a recorded ``lspci -Dnn``."""
    for line in lspci.read_text().splitlines():
        m = re.match(r"^(\S+) .*\[([0-9a-f]{4})\]: .*\[([0-9a-f]{4}):([0-9a-f]{4})\]", line)
        assert m, line
        device = root / m[1]
        device.mkdir(parents=True)
        (device / "vendor").write_text(f"0x{m[3]}\n")
        (device / "device").write_text(f"0x{m[4]}\n")
        (device / "class").write_text(f"0x{m[2]}00\n")  # prog-if 00 for these classes


def nvidia_host_output(
    lspci: Path | None,
    kernel: str,
    loaded: str = "",
    on_disk: str = "",
    secure_boot: bool | None = None,
    container: str = "",
) -> list[str]:
    """What the real NvidiaHost command prints on such a host."""
    command = NvidiaHost().command()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        devices, module, switches, bindir = t / "devices", t / "version", t / "nvswitch", t / "bin"
        devices.mkdir()
        bindir.mkdir()
        if lspci:
            _sysfs_from_lspci(lspci, devices)
        if loaded:
            module.write_text(loaded + "\n")
        for path, local in (
            ("/sys/bus/pci/devices", devices),
            ("/sys/module/nvidia/version", module),
            ("/proc/driver/nvidia-nvswitch/devices", switches),
        ):
            assert command.count(path) == 1, f"NvidiaHost changed ({path}): update this test"
            command = command.replace(path, shlex.quote(str(local)))
        stubs = {
            "uname": f'[ "$1" = -r ] && echo {kernel}',
            "systemd-detect-virt": f"echo {container}" if container else "echo none; exit 1",
            "modinfo": f"echo {on_disk}"
            if on_disk
            else "echo 'modinfo: ERROR: Module nvidia not found.' >&2; exit 1",
        }
        if secure_boot is not None:
            stubs["mokutil"] = f"echo SecureBoot {'enabled' if secure_boot else 'disabled'}"
        for name, body in stubs.items():
            (bindir / name).write_text(f"#!/bin/sh\n{body}\n")
            (bindir / name).chmod(0o755)
        proc = subprocess.run(
            ["sh", "-c", command],
            capture_output=True,
            text=True,
            env={"PATH": f"{bindir}:/usr/bin:/bin"},
            timeout=10,
        )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_fact_on_an_hgx_h100_sees_8_gpus_and_4_nvswitches() -> None:
    state = NvidiaHost().process(nvidia_host_output(HGX, KERNEL["rhel9"], secure_boot=False))
    assert len(state["gpus"]) == 8
    assert state["gpus"][0] == "0000:1b:00.0 0x2330"
    assert state["nvswitches"] == 4
    assert state["secure_boot"] is False
    assert state["kernel"] == KERNEL["rhel9"]
    assert (state["loaded"], state["on_disk"], state["container"]) == ("", "", "")


def test_fact_on_a_vm_sees_its_gpus_and_no_nvswitch() -> None:
    out = nvidia_host_output(VM, KERNEL["ubuntu2404"], loaded=H100_LOADED, on_disk=H100_LOADED)
    state = NvidiaHost().process(out)
    assert [g.split()[0] for g in state["gpus"]] == [
        "0000:09:00.0",
        "0000:0a:00.0",
        "0000:0b:00.0",
        "0000:0c:00.0",
    ]
    assert state["nvswitches"] == 0
    assert state["loaded"] == state["on_disk"] == "580.159.04"
    assert state["secure_boot"] is None  # no mokutil


def test_fact_on_the_lab_container_sees_no_gpu() -> None:
    recorded = (FIXTURES / "nvidia-host-debian12-nspawn.txt").read_text().splitlines()
    state = NvidiaHost().process(recorded)
    assert state == {
        "gpus": [],
        "nvswitches": 0,
        "loaded": "",
        "on_disk": "",
        "secure_boot": None,
        "kernel": "6.18.44-fc-v595",
        "container": "systemd-nspawn",
    }


def test_secure_boot_enabled_is_read_from_mokutil() -> None:
    out = nvidia_host_output(VM, KERNEL["ubuntu2204"], secure_boot=True)
    assert NvidiaHost().process(out)["secure_boot"] is True


def test_unheld_fact_lists_what_the_lab_host_installed() -> None:
    recorded = (FIXTURES / "unheld-debian12-after-install.txt").read_text().splitlines()
    names = UnheldPackages().process(recorded)
    assert {"nvidia-driver", "nvidia-kernel-dkms", "libcuda1", "nvidia-cuda-toolkit"} <= set(names)
    # the apt command itself filters by status: run it on dpkg-query lines
    command = UnheldPackages().command("apt", nv.FAMILIES["apt"].hold)
    assert command.startswith("dpkg-query -W -f='${db:Status-Abbrev} ${Package}\\n'")
    lines = "ii  nvidia-driver\nhi  libcuda1\nii  bash\nii  cuda-toolkit-12-8\nrc  nvidia-old\n"
    filtered = subprocess.run(
        ["sh", "-c", command.split(" | ", 1)[1]], input=lines, capture_output=True, text=True
    )
    assert filtered.stdout.split() == ["nvidia-driver", "cuda-toolkit-12-8"]


def test_unheld_fact_reads_dnf_versionlock_entries() -> None:
    # versionlock.list entries as `dnf versionlock add` writes them (NAME-EPOCH:VERSION-RELEASE.*)
    output = [
        "nvidia-driver",
        "kmod-nvidia-open-dkms",
        "libnvidia-nscq",
        "lock=nvidia-driver-3:580.95.05-1.el9.*",
        "lock=libnvidia-nscq-3:580.95.05-1.*",
        "lock=# Added lock on Fri Nov 27 2026",
    ]
    assert UnheldPackages().process(output) == ["kmod-nvidia-open-dkms"]


def test_dnf_module_fact_reads_the_module_state_file() -> None:
    # /etc/dnf/modules.d/NAME.module as dnf 4 writes it
    text = "[nvidia-driver]\nname=nvidia-driver\nstream=580-open\nprofiles=default\nstate=enabled\n"
    assert DnfModule().process(text.splitlines()) == {
        "name": "nvidia-driver",
        "stream": "580-open",
        "profiles": "default",
        "state": "enabled",
    }


# --- running the roles on the fake host -------------------------------------------------------


def node_config(distro: str, nvidia: dict | None = None, **sections: Any) -> NodeConfig:
    raw = {
        # the firewall (on by default) is the firewall role's: not these roles' concern
        "defaults": {
            "distro": distro,
            "nvidia": nvidia or {},
            "firewall": {"enabled": False},
            **sections,
        },
        "hosts": {HOST: {"connection": {"address": "192.0.2.10"}}},
    }
    return load(raw, source="test_nvidia_roles").hosts[HOST].config


LAST_STATE: list[State] = []  # the last run_roles' pyinfra state (operation metadata)


def run_roles(
    config: NodeConfig,
    gpu_state: list[str],
    handlers: Iterable[Handler] = (),
    roles: tuple[Callable[[], None], ...] = (nvidia_driver, cuda),
) -> Run:
    responses: dict[Any, Response] = {NvidiaHost().command(): gpu_state}
    return run_deploys(config, responses, roles, handlers, host_name=HOST, state_out=LAST_STATE)


def gpu_host(distro: str, nvswitch: bool, **kw: Any) -> list[str]:
    return nvidia_host_output(HGX if nvswitch else VM, KERNEL[distro], **kw)


GPG_INSTALL = re.compile(r" install (.* )?(gpg|gnupg2)$")  # gpg, which reads the keyrings


def install_commands(run: Run) -> list[str]:
    """Package installs, in order (not gpg's, which comes with each repository key)."""
    return [
        c
        for c in run.grep(r"(apt-get|^dnf).* install ")
        if " module " not in c and not GPG_INSTALL.search(c)
    ]


def installs(run: Run) -> list[set[str]]:
    """The package sets of each install command, in order."""
    out = []
    for command in install_commands(run):
        args = command.split(" install ", 1)[1].split()
        out.append({a for a in args if not a.startswith("-")})
    return out


def installed(run: Run) -> set[str]:
    return set().union(*installs(run)) if installs(run) else set()


MATRIX = [
    pytest.param(
        distro, modules, switch, id=f"{distro}-{modules}-{'nvswitch' if switch else 'pcie'}"
    )
    for distro in ALL
    for modules in ("open", "proprietary")
    for switch in (True, False)
]

_FRESH: dict[tuple, Run] = {}


def fresh(distro: str, modules: str, nvswitch: bool) -> Run:
    key = (distro, modules, nvswitch)
    if key not in _FRESH:
        config = node_config(distro, {"kernel_modules": modules})
        _FRESH[key] = run_roles(config, gpu_host(distro, nvswitch))
    return _FRESH[key]


# --- NVIDIA's repository, per distro ------------------------------------------------------------


# The pins, written out (not read from gpunode/nvidia.py): a wrong table row fails here.
CUDA_APT_KEY = ("3bf863cc.pub", "EB693B3035CD5710E231E123A4B469963BF863CC")
CUDA_RPM_KEY = ("D42D0685.pub", "610C7B14E068A878070DA4E99CD0A493D42D0685")
CTK_KEY = ("gpgkey", "C95B321B61E88C1809C4F759DDCAE044F796ECB0")
KEYRINGS = {
    "apt": ("/usr/share/keyrings/gpunode-nvidia-cuda.asc",
            "/usr/share/keyrings/nvidia-container-toolkit-keyring.asc"),
    "dnf": ("/etc/pki/rpm-gpg/RPM-GPG-KEY-gpunode-nvidia-cuda",
            "/etc/pki/rpm-gpg/RPM-GPG-KEY-gpunode-nvidia-container-toolkit"),
}  # fmt: skip


def key_check(run: Run, path: str) -> str:
    """The check of the keyring at ``path`` right after its download (not the fact)."""
    (check,) = [c for c in run.commands if "gpg " in c and path in c and not c.startswith("if [")]
    return check


def written_at(run: Run, path: str) -> int:
    """Where a file the role writes lands in the command sequence (its chmod follows it)."""
    return run.commands.index(f"chmod 644 {path}")


@pytest.mark.parametrize("distro, modules, nvswitch", MATRIX)
def test_repository_files_and_keys(distro: str, modules: str, nvswitch: bool) -> None:
    run = fresh(distro, modules, nvswitch)
    assert not run.failed
    repo = f"{NVIDIA_SITE}/cuda/repos/{CUDA_REPO_DIR[distro]}/x86_64"
    family = "apt" if distro in APT else "dnf"
    cuda_keyring, ctk_keyring = KEYRINGS[family]
    cuda_key = CUDA_APT_KEY if family == "apt" else CUDA_RPM_KEY
    # each key fetched from beside its repository and checked for exactly the pinned key
    # before its repository file is written
    for url, keyring, fingerprint, repo_file in (
        (f"{repo}/{cuda_key[0]}", cuda_keyring, cuda_key[1],
         f"/etc/apt/sources.list.d/cuda-{CUDA_REPO_DIR[distro]}-x86_64.list"
         if family == "apt" else "/etc/yum.repos.d/cuda-rhel9-x86_64.repo"),
        (f"{CTK_SITE}/{CTK_KEY[0]}", ctk_keyring, CTK_KEY[1],
         "/etc/apt/sources.list.d/nvidia-container-toolkit.list"
         if family == "apt" else "/etc/yum.repos.d/nvidia-container-toolkit.repo"),
    ):  # fmt: skip
        (download,) = run.grep(rf"curl -sSLf {re.escape(url)} -o ")
        temp = download.split(" -o ", 1)[1].split()[0]
        moved = run.commands.index(f"mv {temp} {keyring}")
        check = key_check(run, keyring)
        assert fingerprint in check
        assert run.commands.index(download) < moved < run.commands.index(check)
        assert run.commands.index(check) < written_at(run, repo_file)
    # NVIDIA's cuda-keyring .deb (maintainer scripts run as root, trusted on first use) is gone
    assert not run.grep(r"cuda-keyring|dpkg .*-i ")
    if distro in APT:
        listfile = f"/etc/apt/sources.list.d/cuda-{CUDA_REPO_DIR[distro]}-x86_64.list"
        assert content_lines(run.files[listfile]) == [f"deb [signed-by={cuda_keyring}] {repo}/ /"]
        assert content_lines(
            run.files["/etc/apt/sources.list.d/nvidia-container-toolkit.list"]
        ) == [f"deb [signed-by={ctk_keyring}] {CTK_SITE}/stable/deb/$(ARCH) /"]
        assert not [f for f in run.files if f.startswith("/etc/yum.repos.d/")]
    else:
        repo_file = run.files["/etc/yum.repos.d/cuda-rhel9-x86_64.repo"]
        # dnf imports each key from gpunode's pinned copy, never from a URL on first use
        assert content_lines(repo_file) == [
            "[cuda-rhel9-x86_64]",
            "name=cuda-rhel9-x86_64",
            f"baseurl={repo}",
            "enabled=1",
            "gpgcheck=1",
            f"gpgkey=file://{cuda_keyring}",
        ]
        assert content_lines(run.files["/etc/yum.repos.d/nvidia-container-toolkit.repo"]) == [
            "[nvidia-container-toolkit]",
            "name=nvidia-container-toolkit",
            f"baseurl={CTK_SITE}/stable/rpm/$basearch",
            "repo_gpgcheck=1",
            "gpgcheck=0",
            "enabled=1",
            f"gpgkey=file://{ctk_keyring}",
        ]
        if distro == "rhel9":  # EPEL's own release RPM; Rocky/Alma ship epel-release
            assert run.grep(r"epel-release-latest-9\.noarch\.rpm")
        else:
            assert {"epel-release"} in installs(run)
        assert not run.grep(r"apt-get|dpkg ")


@pytest.mark.parametrize("distro, modules, nvswitch", MATRIX)
def test_driver_packages(distro: str, modules: str, nvswitch: bool) -> None:
    run = fresh(distro, modules, nvswitch)
    kernel = KERNEL[distro]
    if distro in APT:
        expected = [
            {"dkms", f"linux-headers-{kernel}"},
            APT_DRIVER[modules] | {"nvidia-persistenced"} | (APT_FABRIC if nvswitch else set()),
        ]
        assert installs(run)[:2] == expected
        assert all("--no-install-recommends" in c for c in install_commands(run))
        # lists refreshed after the repository was added, before the first install
        update = run.commands.index(apt_update_command())
        listfile = f"/etc/apt/sources.list.d/cuda-{CUDA_REPO_DIR[distro]}-x86_64.list"
        assert written_at(run, listfile) < update
        assert update < run.commands.index(install_commands(run)[0])
    else:
        assert installs(run)[-3] == {
            "dkms",
            f"kernel-devel-{kernel}",
            f"kernel-headers-{kernel}",
            "python3-dnf-plugin-versionlock",
        }
        assert run.grep(rf"^dnf -y module install nvidia-driver:{DNF_STREAM[modules]}$")
        assert installs(run)[-2] == {"nvidia-persistenced"} | (DNF_FABRIC if nvswitch else set())
    other = "proprietary" if modules == "open" else "open"
    if distro in APT:
        assert not installed(run) & APT_DRIVER[other]
    else:
        assert not run.grep(rf"nvidia-driver:{DNF_STREAM[other]}")


@pytest.mark.parametrize("distro, modules, nvswitch", MATRIX)
def test_packages_are_held_after_install(distro: str, modules: str, nvswitch: bool) -> None:
    run = fresh(distro, modules, nvswitch)
    if distro in APT:
        holds = run.grep(r"\| xargs -r apt-mark hold$")
        assert holds and all(APT_HOLD in h for h in holds)
        assert all('[ "$status" = ii ]' in h for h in holds)  # installed, not held yet
    else:
        holds = run.grep(r"\| xargs -r dnf versionlock add$")
        assert holds and all(DNF_HOLD in h for h in holds)
    driver = run.commands.index(install_commands(run)[-2])
    assert all(run.commands.index(h) > driver for h in holds)


@pytest.mark.parametrize("distro, modules, nvswitch", MATRIX)
def test_nouveau_blacklist_and_initramfs(distro: str, modules: str, nvswitch: bool) -> None:
    run = fresh(distro, modules, nvswitch)
    assert content_lines(run.files["/etc/modprobe.d/gpunode-blacklist-nouveau.conf"]) == [
        "blacklist nouveau",
        "options nouveau modeset=0",
    ]
    rebuild = "update-initramfs -u -k all" if distro in APT else "dracut --regenerate-all --force"
    assert run.grep(rf"^{re.escape(rebuild)}$")


@pytest.mark.parametrize("distro, modules, nvswitch", MATRIX)
def test_services(distro: str, modules: str, nvswitch: bool) -> None:
    run = fresh(distro, modules, nvswitch)
    for service in ("nvidia-persistenced.service", "nvidia-dcgm.service"):
        assert run.grep(rf"^systemctl start {service}$")
        assert run.grep(rf"^systemctl enable {service}$")
    fabric = run.grep(r"^systemctl (start|enable) nvidia-fabricmanager\.service$")
    assert len(fabric) == (2 if nvswitch else 0)


@pytest.mark.parametrize("distro, modules, nvswitch", MATRIX)
def test_cuda_toolkit_container_toolkit_and_dcgm(distro: str, modules: str, nvswitch: bool) -> None:
    run = fresh(distro, modules, nvswitch)
    join = "=" if distro in APT else "-"
    assert installs(run)[-1] == {
        "cuda-toolkit-13-0",  # branch 580 supports up to CUDA 13.0
        *(f"{p}{join}1.17.8-1" for p in CTK),
        "datacenter-gpu-manager-4-cuda13",
    }
    assert content_lines(run.files["/etc/profile.d/gpunode-cuda.sh"])[0] == (
        "export CUDA_HOME=/usr/local/cuda-13.0"
    )


@pytest.mark.parametrize("distro, modules, nvswitch", MATRIX)
def test_first_install_without_reboot_policy_only_notes_the_reboot(
    distro: str, modules: str, nvswitch: bool
) -> None:
    run = fresh(distro, modules, nvswitch)
    assert not run.grep(r"\breboot\b")
    assert "Reboot needed" in " ".join(run.op_labels)


# --- a converged host: nothing changes, no reboot -----------------------------------------------


def _package_lines(run: Run, family: str) -> list[str]:
    """What a package listing shows after the first run: each package it installed, at
    the version it asked for (the pinned container toolkit) or some version."""
    versions: dict[str, str] = {}
    for package in installed(run):
        name, version = package, "1.0-1"
        for pkg in CTK:
            if package.startswith(f"{pkg}=") or package.startswith(f"{pkg}-1."):
                name, version = pkg, package[len(pkg) + 1 :]
        versions[name] = version
    versions["gpg" if family == "apt" else "gnupg2"] = "2.2.40-1.1"
    if family == "apt":
        # `dpkg -l` lines (format as recorded in fixtures/nvidia/dpkg-l-*.txt), held: "hi"
        return [f"hi  {n:<40} {v:<12} amd64   -" for n, v in sorted(versions.items())]
    versions["epel-release"] = "9-8.el9"
    return [f"{n} {v}" for n, v in sorted(versions.items())]


@pytest.fixture(scope="module")
def keyrings(tmp_path_factory: pytest.TempPathFactory) -> Keyrings:
    return make_keyrings(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def pinned(keyrings: Keyrings, monkeypatch: pytest.MonkeyPatch) -> Keyrings:
    """Every NVIDIA key pinned to the throwaway key A (its keyrings: tests/unit/gpgkeys.py)."""
    names = ("3bf863cc.pub", "D42D0685.pub", "gpgkey")  # raising=False: runs on older code too
    monkeypatch.setattr(nv, "NVIDIA_KEYS", {n: (keyrings.pinned,) for n in names}, raising=False)
    return keyrings


def keyrings_on_host(served: dict[str, Path]) -> Handler:
    """A host whose keyrings (host path -> local file) are these files: every command that
    reads one with gpg (the Keyring fact, the check after a download) runs for real."""

    def handler(command: str) -> Response | None:
        for path, local in served.items():
            if "gpg " in command and path in command:
                proc = run_real(command, path, local)
                return {"success": proc.returncode == 0, "stdout": proc.stdout,
                        "stderr": proc.stderr}  # fmt: skip
        return None

    return handler


def converged_host(distro: str, modules: str, first: Run, keyring: Path) -> list[Handler]:
    """The host ``first`` left behind, its keyrings holding the file ``keyring``."""
    family = "apt" if distro in APT else "dnf"
    packages = _package_lines(first, family)
    files = dict(first.files)
    for path in KEYRINGS[family]:
        files[path] = keyring.read_text(errors="replace")

    def answer(command: str) -> Response | None:
        if "( dpkg -l )" in command and family == "apt":
            return packages
        if re.search(r"\( rpm --queryformat .* -qa \)", command):
            return packages
        # dnf resolves NAME-VERSION-RELEASE with repoquery --whatprovides
        if m := re.search(r"--whatprovides (\S+) \|\| true", command):
            for pkg in CTK:
                if m[1].startswith(f"{pkg}-1."):
                    return [f"{pkg} {m[1][len(pkg) + 1 :]}"]
        if command.startswith("cat /etc/dnf/modules.d/nvidia-driver.module"):
            return [
                "[nvidia-driver]",
                "name=nvidia-driver",
                f"stream={DNF_STREAM[modules]}",
                "profiles=default",
                "state=enabled",
            ]
        show = r"systemctl show --all --property Id --property (\w+) '?([\w.@-]+)'? \)"
        if m := re.search(show, command):
            value = "running" if m[1] == "SubState" else "enabled"
            return [f"Id={m[2]}", f"{m[1]}={value}"]
        return None

    modes = {path: "644" for path in files}
    served = keyrings_on_host({path: keyring for path in KEYRINGS[family]})
    return [served, answer, converged(files, modes)]


CONVERGED = [
    pytest.param(distro, modules, id=f"{distro}-{modules}")
    for distro in ALL
    for modules in ("open", "proprietary")
]


@pytest.mark.parametrize("distro, modules", CONVERGED)
def test_converged_host_changes_nothing_and_is_not_rebooted(
    distro: str, modules: str, pinned: Keyrings
) -> None:
    first = fresh(distro, modules, True)
    config = node_config(distro, {"kernel_modules": modules, "reboot": True})
    state = gpu_host(distro, True, loaded="580.95.05", on_disk="580.95.05")
    handlers = converged_host(distro, modules, first, pinned.files["exact"])
    run = run_roles(config, state, handlers=handlers)
    assert not run.failed
    assert run.uploads == []
    changes = run.grep(
        r"apt-get|dnf -y|^dnf install|apt-mark hold|versionlock add|reboot|update-initramfs"
        r"|dracut|systemctl (start|enable|restart)|dpkg .*-i |curl -sSLf|wget -q|rm -f"
    )
    assert changes == []
    # both keyrings were read by the fact (a read, no change) and held exactly the pin
    family = "apt" if distro in APT else "dnf"
    read = {p for p in KEYRINGS[family] for c in run.commands if c.startswith(f"if [ -e {p} ]")}
    assert read == set(KEYRINGS[family])


@pytest.mark.parametrize("distro", ["ubuntu2404", "rhel9"])
def test_reboot_policy_reboots_one_host_at_a_time_and_checks_the_driver(
    distro: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_clock(monkeypatch, server_ops)
    config = node_config(distro, {"reboot": True, "reboot_timeout": 600})
    run = run_roles(config, gpu_host(distro, False), handlers=[booting()])
    assert not run.failed
    (reboot,) = run.grep(r"\breboot\b")
    assert reboot == "( sleep 1 && systemctl reboot ) </dev/null >/dev/null 2>&1 &"
    assert run.commands.index(reboot) > run.commands.index(install_commands(run)[-2])
    # the driver is checked in the new boot, inside the same one-host-at-a-time operation
    after = run.commands.index(reboot) + 1
    assert run.commands[after : after + 2] == [
        server_ops.BOOT_ID,
        nv.DRIVER_LOADED_CHECK,
    ]
    (meta,) = [
        m
        for m in LAST_STATE[0].op_meta.values()
        if m.names == {"gpunode nvidia driver | Reboot into the new NVIDIA driver"}
    ]
    assert meta.global_arguments["_serial"] is True  # one host at a time


def test_stale_loaded_driver_is_rebooted_even_when_packages_are_converged(
    pinned: Keyrings, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_clock(monkeypatch, server_ops)
    first = fresh("ubuntu2204", "open", True)
    config = node_config("ubuntu2204", {"reboot": True})
    # an earlier run installed 580.95.05; the kernel still runs 580.82.07
    state = gpu_host("ubuntu2204", True, loaded="580.82.07", on_disk="580.95.05")
    handlers = converged_host("ubuntu2204", "open", first, pinned.files["exact"])
    run = run_roles(config, state, handlers=[booting(), *handlers])
    assert not run.failed
    assert run.grep(r"\breboot\b")
    assert not run.grep(r"apt-get .*install")


def test_fabricmanager_follows_config_without_nvswitch_and_can_be_turned_off() -> None:
    # gpu.fabric_manager (what `gpunode verify` checks) installs it on a host with no
    # NVSwitch visible; nvidia.fabricmanager: false keeps it off an HGX board
    wanted = node_config("ubuntu2204", {}, gpu={"required": True, "fabric_manager": True})
    run = run_roles(wanted, gpu_host("ubuntu2204", False), roles=(nvidia_driver,))
    assert APT_FABRIC <= installed(run)
    assert run.grep(r"^systemctl start nvidia-fabricmanager\.service$")
    off = node_config("ubuntu2204", {"fabricmanager": False})
    run = run_roles(off, gpu_host("ubuntu2204", True), roles=(nvidia_driver,))
    assert not APT_FABRIC & installed(run)
    assert not run.grep(r"nvidia-fabricmanager")


# --- the distros' own archives ------------------------------------------------------------------


def test_debian12_distro_source_adds_non_free_and_installs_nvidia_driver() -> None:
    config = node_config(
        "debian12", {"source": "distro", "branch": "535", "kernel_modules": "proprietary"}
    )
    run = run_roles(config, gpu_host("debian12", False))
    sources = run.files["/etc/apt/sources.list.d/gpunode-nvidia-distro.sources"]
    stanzas = [
        dict(line.split(": ", 1) for line in content_lines(s))
        for s in sources.split("\n\n")
        if content_lines(s)
    ]
    assert stanzas == [
        {
            "Types": "deb",
            "URIs": "http://deb.debian.org/debian",
            "Suites": "bookworm bookworm-updates",
            "Components": "contrib non-free non-free-firmware",
            "Signed-By": "/usr/share/keyrings/debian-archive-keyring.gpg",
        },
        {
            "Types": "deb",
            "URIs": "http://deb.debian.org/debian-security",
            "Suites": "bookworm-security",
            "Components": "contrib non-free non-free-firmware",
            "Signed-By": "/usr/share/keyrings/debian-archive-keyring.gpg",
        },
    ]
    assert installs(run) == [
        {"dkms", "linux-headers-6.1.0-28-amd64"},
        {"nvidia-driver", "nvidia-kernel-dkms", "nvidia-persistenced"},
        {"nvidia-cuda-toolkit"},
    ]
    assert not run.grep(r"nvidia\.github\.io|developer\.download|cuda-keyring|dcgm")
    # the lab's path: Debian's own keyring signs non-free; no NVIDIA key is read or fetched
    assert not run.grep(r"gpg|keyrings/gpunode|curl")
    assert content_lines(run.files["/etc/profile.d/gpunode-cuda.sh"])[0] == (
        "export CUDA_HOME=/usr/lib/nvidia-cuda-toolkit"
    )
    labels = " ".join(run.op_labels)
    assert "NVIDIA Container Toolkit" in labels and "DCGM" in labels  # visible skips


def test_debian12_open_modules_pin_the_driver_version() -> None:
    config = node_config(
        "debian12",
        {"source": "distro", "branch": "535", "kernel_modules": "open", "version": "535.261.03"},
    )
    run = run_roles(config, gpu_host("debian12", False), roles=(nvidia_driver,))
    assert {"nvidia-driver", "nvidia-open-kernel-dkms", "nvidia-persistenced"} in installs(run)
    pin = dict(line.split(": ", 1) for line in content_lines(run.files[nv.APT_PIN_FILE]))
    assert pin["Pin"] == "version 535.261.03*"
    assert pin["Pin-Priority"] == "1001"
    assert set(pin["Package"].split()) >= {"*nvidia*", "libcuda*"}


@pytest.mark.parametrize("distro", ["ubuntu2204", "ubuntu2404"])
def test_ubuntu_distro_source_uses_the_server_packages(distro: str) -> None:
    config = node_config(distro, {"source": "distro", "branch": "570"})
    run = run_roles(config, gpu_host(distro, True), roles=(nvidia_driver,))
    assert installs(run)[1] == {
        "nvidia-driver-570-server-open",
        "nvidia-fabricmanager-570",
        "libnvidia-nscq-570",
    }
    assert not [f for f in run.files if f.startswith("/etc/apt/sources.list.d/")]


def test_mirror_replaces_nvidia_download_site() -> None:
    mirror = "http://mirror.internal.example/nvidia"
    config = node_config(
        "ubuntu2204",
        {"mirror": mirror, "mirror_allow_http": True},
        cuda={
            "container_toolkit_mirror": "https://mirror.internal.example/libnvidia-container",
        },
    )
    run = run_roles(config, gpu_host("ubuntu2204", False))
    listfile = run.files["/etc/apt/sources.list.d/cuda-ubuntu2204-x86_64.list"]
    assert f"{mirror}/cuda/repos/ubuntu2204/x86_64/ /" in listfile
    # the keys come from the mirror too, and are held to the same pins
    (download,) = run.grep(
        rf"curl -sSLf {re.escape(mirror)}/cuda/repos/ubuntu2204/x86_64/3bf863cc\.pub"
    )
    assert CUDA_APT_KEY[1] in key_check(run, KEYRINGS["apt"][0])
    assert run.grep(r"curl -sSLf https://mirror\.internal\.example/libnvidia-container/gpgkey")
    assert CTK_KEY[1] in key_check(run, KEYRINGS["apt"][1])
    assert not run.grep(r"developer\.download\.nvidia\.com|nvidia\.github\.io")
    # plain http, allowed by its flag, is said on every run; the https one is not
    labels = " ".join(run.op_labels)
    assert "NVIDIA mirror over plain http" in labels
    assert "Container Toolkit mirror over plain http" not in labels


@pytest.mark.parametrize(
    "section, key, flag",
    [
        ("nvidia", "mirror", "mirror_allow_http"),
        ("cuda", "container_toolkit_mirror", "container_toolkit_mirror_allow_http"),
    ],
)
def test_plain_http_mirror_needs_its_flag(section: str, key: str, flag: str) -> None:
    url = "http://mirror.internal.example/nvidia"
    with pytest.raises(ConfigError) as err:
        node_config("ubuntu2204", **{section: {key: url}})  # type: ignore[arg-type]
    assert str(err.value) == (
        f"test_nvidia_roles: defaults: {section}.{key}: {url!r} is plain http (allowed: "
        f"https:// or file:///, or {section}.{flag}: true beside it for a mirror that only "
        "speaks http, warned about on every run)"
    )
    for good in ("https://mirror.internal.example/nvidia", "file:///srv/mirror/nvidia"):
        node_config("ubuntu2204", **{section: {key: good}})  # type: ignore[arg-type]
    node_config("ubuntu2204", **{section: {key: url, flag: True}})  # type: ignore[arg-type]


# --- keyrings already on the host: checked on every run -----------------------------------------


@pytest.mark.parametrize("distro", ["ubuntu2404", "rhel9"])
@pytest.mark.parametrize("bad", ["extra", "other"])
def test_cuda_keyring_with_another_key_stops_the_host_before_the_repository(
    distro: str, bad: str, pinned: Keyrings
) -> None:
    """Finding 8: NVIDIA's key is pinned, and a keyring on the host that holds anything but
    the pinned key (the key plus another, or another key) fails the host at plan time:
    no repository file, no package from NVIDIA's repository."""
    family = "apt" if distro in APT else "dnf"
    cuda_keyring = KEYRINGS[family][0]
    handler = keyrings_on_host({cuda_keyring: pinned.files[bad]})
    run = run_roles(node_config(distro), gpu_host(distro, False), handlers=[handler])
    assert run.failed
    (failure,) = [out for _cmd, ok, out in run.results if not ok]
    found = {"extra": ", ".join(sorted([pinned.pinned, pinned.other])), "other": pinned.other}
    assert failure.stderr.strip().startswith(
        f"gpunode: host @fake/{HOST}: {cuda_keyring} holds primary keys {found[bad]}; "
        f"expected exactly {pinned.pinned} (allowed: "
    )
    assert not [f for f in run.files if "/sources.list.d/" in f or "/yum.repos.d/" in f]
    assert install_commands(run) == [] and not run.grep(r"apt-get update|curl -sSLf|module install")
    assert apt_update_command() not in run.commands


def test_container_toolkit_keyring_with_another_key_stops_the_cuda_role(pinned: Keyrings) -> None:
    ctk_keyring = KEYRINGS["apt"][1]
    handler = keyrings_on_host({ctk_keyring: pinned.files["extra"]})
    run = run_roles(node_config("debian12"), gpu_host("debian12", False), handlers=[handler])
    assert run.failed
    (failure,) = [out for _cmd, ok, out in run.results if not ok]
    assert f"{ctk_keyring} holds primary keys" in failure.stderr
    assert "/etc/apt/sources.list.d/nvidia-container-toolkit.list" not in run.files
    assert not [c for c in install_commands(run) if "nvidia-container-toolkit" in c]


def test_downloaded_key_with_another_key_is_removed_and_fails(
    pinned: Keyrings, tmp_path: Path
) -> None:
    """A fresh download is checked on the host right away: the real check on a keyring that
    came back with an extra key removes it, and the host fails before the list is written."""
    local = tmp_path / "cuda.asc"
    local.write_bytes(pinned.files["extra"].read_bytes())
    cuda_keyring = KEYRINGS["apt"][0]
    served = keyrings_on_host({cuda_keyring: local})

    def fresh_then_served(command: str) -> Response | None:
        if command.startswith(f"if [ -e {cuda_keyring} ]"):
            return None  # the Keyring fact at plan time: no file yet
        return served(command)

    run = run_roles(
        node_config("debian12"), gpu_host("debian12", False), handlers=[fresh_then_served],
        roles=(nvidia_driver,),
    )  # fmt: skip
    assert run.failed and not local.exists()
    (failure,) = [out for _cmd, ok, out in run.results if not ok]
    assert "holds primary keys" in failure.stderr and "(the file was removed)" in failure.stderr
    # the failure came right after the download: nothing after it ran
    assert run.commands[-1] == key_check(run, cuda_keyring)
    assert install_commands(run) == []


def test_host_with_nvidias_cuda_keyring_package_moves_to_the_pinned_key(pinned: Keyrings) -> None:
    """A host converged by an older gpunode has NVIDIA's cuda-keyring .deb: it is purged
    (with its package-owned keyring and sources file) before gpunode writes the sources
    file that points at the pinned keyring."""
    first = fresh("ubuntu2404", "open", False)
    lines = _package_lines(first, "apt") + [f"ii  {'cuda-keyring':<40} {'1.1-1':<12} all   -"]

    def dpkg(command: str) -> Response | None:
        return lines if "( dpkg -l )" in command else None

    run = run_roles(
        node_config("ubuntu2404"), gpu_host("ubuntu2404", False),
        handlers=[dpkg, keyrings_on_host({p: pinned.files["exact"] for p in KEYRINGS["apt"]})],
        roles=(nvidia_driver,),
    )  # fmt: skip
    assert not run.failed
    (purge,) = run.grep(r"apt-get .* purge cuda-keyring$")
    listfile = "/etc/apt/sources.list.d/cuda-ubuntu2404-x86_64.list"
    assert run.commands.index(purge) < written_at(run, listfile)
    assert f"signed-by={KEYRINGS['apt'][0]}" in run.files[listfile]


# --- hosts without a GPU, Secure Boot --------------------------------------------------------


LAB = (FIXTURES / "nvidia-host-debian12-nspawn.txt").read_text().splitlines()


def test_no_gpu_is_a_visible_skip_by_default() -> None:
    run = run_roles(node_config("debian12"), LAB)
    assert not run.failed
    assert run.uploads == []
    assert not run.grep(r"apt-get|dpkg -i|systemctl")
    labels = " ".join(run.op_labels)
    assert "NVIDIA driver: no NVIDIA GPU" in labels and "CUDA: no NVIDIA GPU" in labels


def test_no_gpu_fails_the_host_when_a_gpu_is_required() -> None:
    run = run_roles(node_config("debian12", gpu={"required": True}), LAB)
    assert run.failed
    (failure,) = [out for _cmd, ok, out in run.results if not ok]
    assert "gpu.required: true, but no NVIDIA GPU was found" in failure.stderr
    assert not run.grep(r"apt-get|dpkg -i")


def test_install_always_installs_in_a_container_without_building_or_rebooting() -> None:
    config = node_config(
        "debian12",
        {
            "install": "always",
            "source": "distro",
            "branch": "535",
            "kernel_modules": "proprietary",
            "reboot": True,
        },
    )
    run = run_roles(config, LAB)
    assert not run.failed
    assert installs(run)[0] == {"dkms"}  # no headers: the kernel is the machine's
    assert not run.grep(r"update-initramfs|\breboot\b|systemctl start")
    assert run.grep(r"^systemctl enable nvidia-persistenced\.service$")
    labels = " ".join(run.op_labels)
    assert "Kernel headers" in labels and "Rebuild the initramfs" in labels


def test_secure_boot_without_module_signing_fails_before_any_change() -> None:
    run = run_roles(node_config("ubuntu2404"), gpu_host("ubuntu2404", False, secure_boot=True))
    assert run.failed
    (failure,) = [out for _cmd, ok, out in run.results if not ok]
    assert "Secure Boot is on" in failure.stderr and "nvidia.module_signing" in failure.stderr
    assert run.uploads == [] and not run.grep(r"apt-get|dpkg -i")


def test_secure_boot_with_module_signing_configures_dkms() -> None:
    signing = {
        "key_file": "/var/lib/shim-signed/mok/MOK.priv",
        "cert_file": "/var/lib/shim-signed/mok/MOK.der",
    }
    config = node_config("ubuntu2404", {"module_signing": signing})
    run = run_roles(config, gpu_host("ubuntu2404", False, secure_boot=True), roles=(nvidia_driver,))
    assert not run.failed
    assert content_lines(run.files[nv.DKMS_SIGNING_CONF]) == [
        "mok_signing_key=/var/lib/shim-signed/mok/MOK.priv",
        "mok_certificate=/var/lib/shim-signed/mok/MOK.der",
    ]


# --- config load ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "distro, nvidia, sections, message",
    [
        (
            "debian12",
            {"source": "distro"},
            {},
            "nvidia.branch: debian12's archive has driver branch 535 only, not 580",
        ),
        (
            "debian12",
            {"source": "distro", "branch": "535"},
            {},
            "nvidia.kernel_modules: open: debian12's open kernel modules are not updated",
        ),
        ("rhel9", {"source": "distro"}, {}, "nvidia.source: distro: rhel9 ships no NVIDIA driver"),
        (
            "debian12",
            {
                "source": "distro",
                "branch": "535",
                "kernel_modules": "proprietary",
                "fabricmanager": True,
            },
            {},
            "nvidia.fabricmanager: true: debian12's archive has no fabric manager",
        ),
        (
            "debian12",
            {"source": "distro", "branch": "535", "kernel_modules": "proprietary"},
            {"cuda": {"version": "12.2"}},
            "cuda.version: debian12's archive has CUDA 11.8 only, not 12.2",
        ),
        (
            "ubuntu2204",
            {"source": "distro", "branch": "535"},
            {"cuda": {"dcgm": True}},
            "cuda.dcgm: true: DCGM comes from NVIDIA's CUDA repository only",
        ),
        (
            "ubuntu2204",
            {"branch": "535"},
            {"cuda": {"version": "12.8"}},
            "cuda.version: CUDA 12.8 needs a newer driver than branch 535",
        ),
        (
            "ubuntu2204",
            {"fabricmanager": False},
            {"gpu": {"required": True, "fabric_manager": True}},
            "nvidia.fabricmanager: false contradicts gpu.fabric_manager: true",
        ),
        (
            "ubuntu2204",
            {"install": "never"},
            {"gpu": {"required": True}},
            "nvidia.install: never contradicts gpu.required: true",
        ),
    ],
)
def test_bad_combinations_are_refused_at_config_load(
    distro: str, nvidia: dict, sections: dict, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        node_config(distro, nvidia, **sections)
    assert f"host {HOST}: {message}" in str(err.value)
    assert "allowed:" in str(err.value)


def test_unknown_cuda_version_is_refused_with_the_known_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"cuda\.version: '12\.7' is not a CUDA version.*allowed: 11\.5"
    ):
        node_config("ubuntu2204", {}, cuda={"version": "12.7"})


def test_operation_labels_carry_no_config_values() -> None:
    mirror = "http://mirror.secret.example/nvidia"
    config = node_config(
        "ubuntu2204", {"mirror": mirror, "mirror_allow_http": True, "version": "580.95.05"}
    )
    run = run_roles(config, gpu_host("ubuntu2204", True))
    leaks = [
        label
        for label in run.op_labels
        for v in ("mirror.secret.example", "580.95.05")
        if v in label
    ]
    assert leaks == []


# --- EPEL on RHEL 9: the release RPM from a URL, checked against EPEL's pinned key -------------


def test_epel_release_rpm_is_installed_only_with_its_signature_checked(
    pinned: Keyrings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RHEL 9 gets dkms from EPEL, whose release RPM comes from a URL: dnf does not check a
    local package's signature unless told to, so the key is fetched, checked against its pin,
    imported, and the RPM installed with localpkg_gpgcheck (it was ``dnf.rpm``, unchecked)."""
    monkeypatch.setattr(nv, "EPEL_KEY_FINGERPRINTS", (pinned.pinned,))
    served = keyrings_on_host({nv.EPEL_KEYRING: pinned.files["exact"]})

    def fresh_then_served(command: str) -> Response | None:
        if command.startswith(f"if [ -e {nv.EPEL_KEYRING} ]"):
            return None  # the Keyring fact at plan time: no file yet
        return served(command)

    run = run_roles(node_config("rhel9"), gpu_host("rhel9", False), handlers=[fresh_then_served])
    assert not run.failed

    def first(pattern: str, after: int = -1) -> int:
        return next(i for i, c in enumerate(run.commands) if i > after and re.search(pattern, c))

    fetched = first(rf"curl -sSLf {re.escape(nv.EPEL_KEY_URL)} ")
    checked = first(rf"--show-keys .*{re.escape(nv.EPEL_KEYRING)}", after=fetched)
    imported = first(rf"rpm --import {re.escape(nv.EPEL_KEYRING)}")
    installed = first(
        rf"dnf install -y --setopt=localpkg_gpgcheck=1 {re.escape(nv.EPEL_RELEASE_RPM)}"
    )
    assert fetched < checked < imported < installed
    assert not run.grep(rf"rpm -i\S* {re.escape(nv.EPEL_RELEASE_RPM)}")


@pytest.mark.parametrize("bad", ["extra", "other"])
def test_an_epel_key_with_another_key_stops_the_host_before_the_release_rpm(
    bad: str, pinned: Keyrings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nv, "EPEL_KEY_FINGERPRINTS", (pinned.pinned,))
    handler = keyrings_on_host({nv.EPEL_KEYRING: pinned.files[bad]})
    run = run_roles(node_config("rhel9"), gpu_host("rhel9", False), handlers=[handler])
    assert run.failed
    assert any(f"{nv.EPEL_KEYRING} holds primary keys" in out.stderr for _c, ok, out in run.results
               if not ok)  # fmt: skip
    assert not run.grep(r"rpm --import|epel-release")
