"""The Vagrant lab on real VMs: the Vagrantfile's VMs under libvirt, from a box built here.

    sudo make vm-lab          # libvirtd, the box, `vagrant up`, the deploy, `gpunode verify`
    sudo make vm-lab-down     # no VM, disk, network or process of the lab left behind

``gpunode vm-lab up`` starts libvirtd where it does not run (by hand where systemd is not
PID 1), builds the box (below) where its inputs changed, adds it to a Vagrant home of the
lab's own (``VAGRANT_HOME`` under the cache, so a user's boxes are never touched), runs
``vagrant up --provider=libvirt`` for the VMs of inventories/vagrant.yml and starts the
package proxy the VMs use. ``inventories/vagrant.py`` reads the lab's state file
(``.lab/vm/state.json``) for the SSH key and the proxy while the lab is up.

**The box.** No box can be downloaded here, so it is built from the nspawn lab's debootstrap
base image: Debian 12 with ``linux-image-amd64`` (the security suite's kernel),
``openssh-server``, ``sudo`` and ``ifupdown`` (Vagrant's Debian guest support configures
the private network with it), the ``vagrant`` user with passwordless sudo and **one key made
for this machine** (``/var/cache/gpunode/vmbox/vagrant_ed25519``, 0600; never Vagrant's
well-known insecure key), no SSH host keys (each VM makes its own at first boot), an empty
machine-id. The disk (qcow2) has a GPT with an EFI system partition and one ext4 root file
system (``mkfs.ext4 -d``); the VM boots through UEFI (Debian's OVMF as its firmware,
declared in the box's own Vagrantfile) and a GRUB made at build time
(``grub-mkstandalone``, on the EFI partition's removable-media path) that loads the
kernel and initramfs the VM keeps in its own ``/boot`` (Debian's ``/vmlinuz`` and
``/initrd.img`` links). So the VM boots what it updates itself: an initramfs rebuilt for the
nouveau blacklist, a module built by DKMS, a new kernel. Nothing of GRUB stays installed in
the VM and no EFI variable is written. The box is named after a digest of its inputs
(``gpunode/debian12-<digest>``) and rebuilt only when they change.

**The network.** The VMs sit on two libvirt networks without forwarding (``mode none``):
Vagrant's management network (``vagrant ssh``) and the private network of
inventories/vagrant.yml (pyinfra). Neither routes anywhere; the only way out is a filtering
proxy (tinyproxy, on the private network's host address) that allows the Debian archive and
nothing else, as in the nspawn lab.

**KVM or TCG.** The Vagrantfile uses KVM where ``/dev/kvm`` is there and the CPU has VMX or
SVM, and QEMU's software emulation (TCG) where not (this project's development machines):
``GPUNODE_VAGRANT_ACCEL=kvm|qemu`` overrides it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpunode.commands import lab
from gpunode.config import read_yaml
from gpunode.paths import REPO_ROOT
from gpunode.schema.distros import DISTROS

BOX_VERSION = 2  # bump when the box's preparation changes
BOX_PREFIX = "gpunode/debian12-"
BOX_PACKAGES = ("linux-image-amd64", "openssh-server", "sudo", "ifupdown", "isc-dhcp-client")
# in the image only while its boot loader is made, then purged
BOOT_LOADER_PACKAGES = ("grub-efi-amd64-bin",)
BOX_DISK_GIB = 20
# The disk: GPT, the EFI system partition (FAT) from 1 MiB, the root file system after it
ESP_START_MIB, ESP_MIB = 1, 64
ROOT_START_MIB = ESP_START_MIB + ESP_MIB
# UEFI firmware of Debian's ovmf package, as the VMs' ROM (no NVRAM: the firmware boots the
# EFI partition's removable-media path, EFI/BOOT/BOOTX64.EFI)
FIRMWARE = "/usr/share/ovmf/OVMF.fd"
# the kernel's command line; eth0, eth1: the names Vagrant's Debian guest support writes into
# /etc/network/interfaces
KERNEL_CMDLINE = "root=LABEL=root rw console=ttyS0 net.ifnames=0 biosdevname=0"
# GRUB's configuration, inside its EFI binary: the VM's own kernel and initramfs, through the
# links Debian keeps in / to the newest ones in /boot
GRUB_CFG = f"""\
insmod part_gpt
insmod ext2
search --no-floppy --label root --set=root
linux /vmlinuz {KERNEL_CMDLINE}
initrd /initrd.img
boot
"""
GRUB_MODULES = ("part_gpt", "ext2", "search", "search_label", "linux", "normal", "configfile")
BOX_VAGRANTFILE = f"""\
# The gpunode VM lab's box (gpunode/commands/vmlab.py): UEFI firmware, then the GRUB on the
# disk's EFI system partition boots the VM's own /vmlinuz and /initrd.img.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.loader = "{FIRMWARE}"
  end
end
"""
HOST_KEYS_UNIT = """\
[Unit]
Description=SSH host keys of this VM, made at its first boot
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
"""
LIBVIRT_URI = "qemu:///system"
REQUIRED_TOOLS = {
    "vagrant": "vagrant",
    "virsh": "libvirt-clients",
    "libvirtd": "libvirt-daemon",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "dnsmasq": "dnsmasq-base",
    "iptables": "iptables",
    "mkfs.ext4": "e2fsprogs",
    "tinyproxy": "tinyproxy",
    "debootstrap": "debootstrap",
    "sfdisk": "fdisk",
    "mkfs.fat": "dosfstools",
    "mcopy": "mtools",
}


class VmLabError(Exception):
    """What went wrong, for the user (no traceback)."""


@dataclass(frozen=True)
class VmLabSettings:
    state_dir: Path = REPO_ROOT / ".lab" / "vm"
    cache_dir: Path = Path("/var/cache/gpunode/vmbox")
    proxy_port: int = 8898

    @classmethod
    def from_env(cls) -> VmLabSettings:
        env = os.environ
        port = env.get("GPUNODE_VM_LAB_PROXY_PORT", "8898")
        if not port.isdigit() or not 1024 <= int(port) <= 65535:
            raise VmLabError(f"GPUNODE_VM_LAB_PROXY_PORT={port[:20]!r} (allowed: 1024-65535)")
        return cls(
            state_dir=Path(env.get("GPUNODE_VM_LAB_DIR") or REPO_ROOT / ".lab" / "vm"),
            cache_dir=Path(env.get("GPUNODE_VM_LAB_CACHE") or "/var/cache/gpunode/vmbox"),
            proxy_port=int(port),
        )

    @property
    def key(self) -> Path:
        return self.cache_dir / "vagrant_ed25519"

    @property
    def vagrant_home(self) -> Path:
        return self.cache_dir / "vagrant-home"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"


def box_inputs(base_stamp: dict[str, Any], public_key: str) -> dict[str, Any]:
    """Everything the box is made from: the box's name carries its digest."""
    return {
        "version": BOX_VERSION,
        "base": base_stamp,
        "packages": list(BOX_PACKAGES),
        "disk_gib": BOX_DISK_GIB,
        "vagrantfile": BOX_VAGRANTFILE,
        "boot": {
            "packages": list(BOOT_LOADER_PACKAGES),
            "grub_cfg": GRUB_CFG,
            "modules": list(GRUB_MODULES),
            "esp": [ESP_START_MIB, ESP_MIB],
        },
        "host_keys_unit": HOST_KEYS_UNIT,
        "public_key": public_key,
    }


def box_name(inputs: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return BOX_PREFIX + digest[:12]


def box_metadata() -> dict[str, Any]:
    """metadata.json of a vagrant-libvirt box (format version 1: one qcow2 disk)."""
    return {"provider": "libvirt", "format": "qcow2", "virtual_size": BOX_DISK_GIB}


def _env(settings: VmLabSettings, box: str) -> dict[str, str]:
    """The environment `vagrant` runs in: the lab's own Vagrant home, its box and key."""
    return {
        **os.environ,
        "VAGRANT_HOME": str(settings.vagrant_home),
        "GPUNODE_VAGRANT_BOX": box,
        "GPUNODE_VAGRANT_KEY": str(settings.key),
        "VAGRANT_DEFAULT_PROVIDER": "libvirt",
        "LC_ALL": "C.UTF-8",
    }


def preflight() -> None:
    if os.geteuid() != 0:
        raise VmLabError("the VM lab needs root (libvirt's system instance, the box build)")
    missing = sorted({pkg for tool, pkg in REQUIRED_TOOLS.items() if not _which(tool)})
    if not Path(FIRMWARE).is_file():
        missing.append("ovmf")
    if missing:
        raise VmLabError(f"missing tools; install: apt-get install {' '.join(missing)}")
    plugins = lab._run(["vagrant", "plugin", "list"], check=False).stdout
    if "vagrant-libvirt" not in plugins:
        raise VmLabError("vagrant-libvirt is not installed (apt-get install vagrant-libvirt)")


def _which(tool: str) -> str | None:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return shutil.which(tool, path=path)


# --- libvirtd -------------------------------------------------------------------------


def libvirt_answers() -> bool:
    done = lab._run(["virsh", "-c", LIBVIRT_URI, "version"], check=False, timeout=30)
    return done.returncode == 0


def ensure_libvirtd(settings: VmLabSettings, state: dict[str, Any]) -> None:
    """libvirt's system instance: started by systemd where it is PID 1, else by hand (with the
    user, groups and folders libvirt-daemon-system's install would have made)."""
    if libvirt_answers():
        return
    if Path("/run/systemd/system").is_dir():
        lab._run(["systemctl", "start", "libvirtd.service"], check=False)
    else:
        for group in ("kvm", "libvirt-qemu"):
            lab._run(["groupadd", "-r", group], check=False)
        lab._run(
            ["useradd", "-r", "-g", "libvirt-qemu", "-G", "kvm", "-d", "/var/lib/libvirt"]
            + ["-s", "/usr/sbin/nologin", "libvirt-qemu"],
            check=False,
        )
        for folder in ("/var/log/libvirt/qemu", "/run/libvirt", "/var/lib/libvirt/images"):
            Path(folder).mkdir(parents=True, exist_ok=True)
        logs = settings.state_dir
        state["virtlogd_pid"] = lab._spawn(["virtlogd"], logs / "virtlogd.log")
        state["libvirtd_pid"] = lab._spawn(["libvirtd"], logs / "libvirtd.log")
    deadline = time.monotonic() + 30
    while not libvirt_answers():
        if time.monotonic() > deadline:
            raise VmLabError(f"libvirtd does not answer; see {settings.state_dir}/libvirtd.log")
        time.sleep(0.5)


# --- the box --------------------------------------------------------------------------


def ensure_key(settings: VmLabSettings) -> str:
    """The vagrant user's key for this machine's boxes (made once); its public half."""
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    if not settings.key.exists():
        lab._run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "gpunode-vm-lab"]
            + ["-f", str(settings.key)]
        )
    os.chmod(settings.key, 0o600)
    return Path(f"{settings.key}.pub").read_text().strip()


def ensure_box(settings: VmLabSettings) -> str:
    """The box's name, built and added to the lab's Vagrant home unless it already is."""
    lab_settings = lab.LabSettings.from_env()
    mirror = lab_settings.mirror or lab.machine_mirror()
    base = lab.ensure_base_image(lab_settings, mirror)
    stamp = json.loads((base / ".gpunode-base.json").read_text())
    name = box_name(box_inputs(stamp, ensure_key(settings)))
    env = _env(settings, name)
    with lab._locked(settings.cache_dir / ".box.lock"):
        listed = lab._run(["vagrant", "box", "list"], check=False, env=env).stdout
        if any(line.split()[:1] == [name] for line in listed.splitlines()):
            return name
        started = time.monotonic()
        lab._say(f"building the VM lab's box {name} (about a minute)")
        box_file = _build_box(settings, base, name)
        lab._run(["vagrant", "box", "add", "--force", "--name", name, str(box_file)], env=env)
        box_file.unlink()
        for line in listed.splitlines():  # the boxes of earlier inputs
            old = line.split()[:1]
            if old and old[0].startswith(BOX_PREFIX) and old[0] != name:
                lab._run(
                    ["vagrant", "box", "remove", "--force", "--all", old[0]], check=False, env=env
                )
        lab._say(f"box {name} ready in {time.monotonic() - started:.0f} s")
    return name


def _build_box(settings: VmLabSettings, base: Path, name: str) -> Path:
    work = settings.cache_dir / "work"
    if work.exists():
        shutil.rmtree(work)
    root = work / "root"
    work.mkdir(parents=True)
    lab._run(["cp", "-a", str(base), str(root)])
    _install(root)
    _prepare(root, Path(f"{settings.key}.pub").read_text())
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise VmLabError(f"the box has {len(kernels)} kernels in /boot (expected 1)")
    for link in ("vmlinuz", "initrd.img"):
        if not (root / link).is_symlink():
            raise VmLabError(f"the box has no /{link} link (linux-base makes it): GRUB boots it")
    boot_loader = _boot_loader(root, work)
    disk = work / "disk.raw"
    make_disk(disk, root, boot_loader)
    lab._run(["qemu-img", "convert", "-O", "qcow2", str(disk), str(work / "box.img")])
    disk.unlink()
    shutil.rmtree(root)
    (work / "metadata.json").write_text(json.dumps(box_metadata()) + "\n")
    (work / "Vagrantfile").write_text(BOX_VAGRANTFILE)
    box_file = settings.cache_dir / f"{name.replace('/', '_')}.box"
    with tarfile.open(box_file, "w") as tar:
        for member in ("metadata.json", "Vagrantfile", "box.img"):
            tar.add(work / member, arcname=member)
    shutil.rmtree(work)
    return box_file


def _boot_loader(root: Path, work: Path) -> Path:
    """GRUB as one EFI binary with GRUB_CFG inside, made with the image's own GRUB, which is
    purged again (the VM keeps no boot loader package: nothing runs grub-install there)."""
    failed = lab.chroot_apt(
        root, [["-y", "install", "--no-install-recommends", *BOOT_LOADER_PACKAGES]], timeout=1800
    )
    if failed:
        raise VmLabError(f"box: apt-get {' '.join(failed[0])}: {failed[1]}")
    (root / "tmp/gpunode-grub.cfg").write_text(GRUB_CFG)
    lab._run(
        ["chroot", str(root), "grub-mkstandalone", "--format=x86_64-efi"]
        + ["--output=/tmp/BOOTX64.EFI", f"--install-modules={' '.join(GRUB_MODULES)}"]
        + [f"--modules={' '.join(GRUB_MODULES)}", "--locales=", "--fonts=", "--themes="]
        + ["boot/grub/grub.cfg=/tmp/gpunode-grub.cfg"]
    )
    binary = work / "BOOTX64.EFI"
    shutil.move(root / "tmp/BOOTX64.EFI", binary)
    (root / "tmp/gpunode-grub.cfg").unlink()
    failed = lab.chroot_apt(root, [["-y", "purge", "--autoremove", *BOOT_LOADER_PACKAGES]])
    if failed:
        raise VmLabError(f"box: apt-get {' '.join(failed[0])}: {failed[1]}")
    return binary


def make_disk(disk: Path, root: Path, boot_loader: Path, gib: int = BOX_DISK_GIB) -> None:
    """A whole-disk image at ``disk`` without a loop device: a GPT (sfdisk), the EFI system
    partition (FAT, ``boot_loader`` as EFI/BOOT/BOOTX64.EFI) and the ext4 root file system
    labelled ``root`` with the tree at ``root`` in it, each written at its offset."""
    with disk.open("wb") as f:
        f.truncate(gib << 30)
    table = (
        "label: gpt\n"
        f"start={ESP_START_MIB}MiB, size={ESP_MIB}MiB, type=U, name=esp\n"
        f"start={ROOT_START_MIB}MiB, type=L, name=root\n"
    )
    written = subprocess.run(
        ["sfdisk", "--quiet", str(disk)], input=table, text=True, capture_output=True, check=False
    )
    if written.returncode:
        raise VmLabError(f"sfdisk {disk}: {written.stderr.strip()[-500:]}")
    listed = json.loads(lab._run(["sfdisk", "--json", str(disk)]).stdout)
    parts = listed["partitiontable"]["partitions"]
    sector = int(listed["partitiontable"].get("sectorsize", 512))
    if [p["start"] * sector for p in parts] != [ESP_START_MIB << 20, ROOT_START_MIB << 20]:
        raise VmLabError(f"{disk}: unexpected partitions {parts}")
    esp_sectors, root_bytes = parts[0]["size"], parts[1]["size"] * sector
    lab._run(
        ["mkfs.fat", "-F", "16", "-n", "ESP", f"--offset={(ESP_START_MIB << 20) // sector}"]
        + [str(disk), str(esp_sectors * sector // 1024)]
    )
    esp = f"{disk}@@{ESP_START_MIB << 20}"
    lab._run(["mmd", "-i", esp, "::/EFI", "::/EFI/BOOT"])
    lab._run(["mcopy", "-i", esp, str(boot_loader), "::/EFI/BOOT/BOOTX64.EFI"])
    lab._run(
        ["mkfs.ext4", "-q", "-F", "-L", "root", "-E", f"offset={ROOT_START_MIB << 20}"]
        + ["-d", str(root), str(disk), f"{root_bytes // 1024}k"]
    )


def _install(root: Path) -> None:
    """BOX_PACKAGES from the machine's Debian archive and its security suite (the kernel of
    today, not the one of the release)."""
    steps = [
        ["update"],
        ["-y", "upgrade"],
        ["-y", "install", "--no-install-recommends", *BOX_PACKAGES],
    ]
    failed = lab.chroot_apt(root, steps, timeout=1800)
    if failed:
        step, why = failed
        raise VmLabError(f"box: apt-get {' '.join(step)}: {why}")


def _prepare(root: Path, public_key: str) -> None:
    def chroot(*argv: str) -> str:
        return lab._run(["chroot", str(root), *argv]).stdout.strip()

    chroot("useradd", "-m", "-s", "/bin/bash", "-U", "vagrant")
    uid, gid = int(chroot("id", "-u", "vagrant")), int(chroot("id", "-g", "vagrant"))
    ssh = root / "home/vagrant/.ssh"
    ssh.mkdir(mode=0o700)
    (ssh / "authorized_keys").write_text(public_key.strip() + "\n")
    (ssh / "authorized_keys").chmod(0o600)
    for path in (ssh, ssh / "authorized_keys"):
        os.chown(path, uid, gid)
    sudoers = root / "etc/sudoers.d/vagrant"
    sudoers.write_text("vagrant ALL=(ALL) NOPASSWD: ALL\n")
    sudoers.chmod(0o440)
    (root / "etc/fstab").write_text("LABEL=root / ext4 defaults,errors=remount-ro 0 1\n")
    (root / "etc/network/interfaces").write_text(
        "auto lo\niface lo inet loopback\n\n# Vagrant's management network\n"
        "auto eth0\niface eth0 inet dhcp\n"
    )
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    unit = root / "etc/systemd/system/gpunode-ssh-host-keys.service"
    unit.write_text(HOST_KEYS_UNIT)
    wants = root / "etc/systemd/system/multi-user.target.wants/gpunode-ssh-host-keys.service"
    wants.symlink_to("/etc/systemd/system/gpunode-ssh-host-keys.service")
    (root / "etc/machine-id").write_text("")
    (root / "etc/hostname").write_text("debian12\n")


# --- the lab ----------------------------------------------------------------------------

MGMT_NETWORK = "gpunode-vm"  # the Vagrantfile's names for the two libvirt networks
PRIVATE_NETWORK = "gpunode-vm-private"
VAGRANT_INVENTORY = REPO_ROOT / "inventories" / "vagrant.yml"


def private_gateway() -> tuple[str, str]:
    """(the host's address on the private network, the network) from inventories/vagrant.yml:
    vagrant-libvirt gives the host the first address of the VMs' /24."""
    doc = read_yaml(VAGRANT_INVENTORY) or {}
    nets = set()
    for name, host in (doc.get("hosts") or {}).items():
        address = ((host or {}).get("connection") or {}).get("address")
        try:
            nets.add(ipaddress.ip_interface(f"{address}/24").network)
        except ValueError as exc:
            raise VmLabError(
                f"{VAGRANT_INVENTORY}: host {name}: connection.address: {exc}"
            ) from None
    if len(nets) != 1:
        raise VmLabError(
            f"{VAGRANT_INVENTORY}: the VMs' addresses span {len(nets)} /24 networks "
            "(allowed: one, the private network)"
        )
    (net,) = nets
    return str(net.network_address + 1), str(net)


def _load_state(settings: VmLabSettings) -> dict[str, Any]:
    try:
        return dict(json.loads(settings.state_file.read_text()))
    except (OSError, ValueError):
        return {}


def _save_state(settings: VmLabSettings, state: dict[str, Any]) -> None:
    lab._write_private(settings.state_file, json.dumps(state, indent=1, sort_keys=True) + "\n")


def ensure_proxy(settings: VmLabSettings, state: dict[str, Any]) -> None:
    """tinyproxy on the private network's host address: the Debian archive and nothing else."""
    if lab.pid_alive(state.get("proxy_pid", 0), "tinyproxy"):
        return
    gateway, network = private_gateway()
    lab_settings = lab.LabSettings.from_env()
    mirror = lab_settings.mirror or lab.machine_mirror()
    security = DISTROS[lab.LAB_DISTRO].apt_security_archive or ""
    d = settings.state_dir
    lab.write_proxy_config(d, gateway, settings.proxy_port, network, (mirror, security))
    state["proxy_pid"] = lab._spawn(
        ["tinyproxy", "-d", "-c", str(d / "tinyproxy.conf")], d / "tinyproxy.log"
    )
    state["proxy"] = f"http://{gateway}:{settings.proxy_port}"
    lab._wait_tcp(gateway, settings.proxy_port, 10, "the VM lab's proxy (tinyproxy)")
    if not lab.pid_alive(state["proxy_pid"], "tinyproxy"):
        raise VmLabError(f"tinyproxy exited at start; see {d / 'tinyproxy.log'}")


def vagrant(settings: VmLabSettings, box: str, *args: str, check: bool = True) -> int:
    """`vagrant ARGS` in the repository (its Vagrantfile), output passed through."""
    done = subprocess.run(["vagrant", *args], cwd=REPO_ROOT, env=_env(settings, box), check=False)
    if check and done.returncode:
        raise VmLabError(f"vagrant {' '.join(args)} exited {done.returncode}")
    return done.returncode


def up(settings: VmLabSettings) -> dict[str, Any]:
    preflight()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    state = _load_state(settings)
    ensure_libvirtd(settings, state)
    _save_state(settings, state)
    state["box"] = ensure_box(settings)
    state["key"] = str(settings.key)
    _save_state(settings, state)
    # vagrant-libvirt makes the "default" storage pool where there is none; down removes it
    state.setdefault("pool_made", _virsh("pool-info", "default").returncode != 0)
    _save_state(settings, state)
    started = time.monotonic()
    vagrant(settings, state["box"], "up", "--provider=libvirt")
    lab._say(f"VMs up in {time.monotonic() - started:.0f} s")
    ensure_proxy(settings, state)
    _save_state(settings, state)
    return state


def _virsh(*args: str) -> subprocess.CompletedProcess[str]:
    return lab._run(["virsh", "-c", LIBVIRT_URI, *args], check=False, timeout=120)


def lab_domains() -> list[str]:
    """The libvirt domains of the lab's VMs: vagrant-libvirt names each after the project
    folder and the machine (``main_gpu-01``), the machines being inventories/vagrant.yml's."""
    doc = read_yaml(VAGRANT_INVENTORY) or {}
    return [f"{REPO_ROOT.name}_{name}" for name in doc.get("hosts") or {}]


def remove_domains(domains: list[str]) -> list[str]:
    """Each of ``domains`` libvirt still has stopped and undefined, with its disks and UEFI
    variables (what ``vagrant destroy`` left: it failed, or an interrupted ``vagrant up``
    holds its lock); the disks of VMs never defined deleted. Returns those still there."""
    for domain in domains:
        if _virsh("dominfo", domain).returncode != 0:
            continue
        _virsh("destroy", domain)
        if _virsh("undefine", "--nvram", "--remove-all-storage", domain).returncode != 0:
            _virsh("undefine", "--remove-all-storage", domain)
    disks = {f"{domain}.img" for domain in domains}
    for volume in _virsh("vol-list", "default").stdout.split():
        if volume in disks:
            _virsh("vol-delete", "--pool", "default", volume)
    return [domain for domain in domains if _virsh("dominfo", domain).returncode == 0]


def down(settings: VmLabSettings) -> None:
    """Every VM, disk, network and process of the lab gone (the box cache stays)."""
    state = _load_state(settings)
    if state.get("box") and libvirt_answers():
        vagrant(settings, state["box"], "destroy", "-f", check=False)
    if libvirt_answers():
        left = remove_domains(lab_domains())
        if left:  # the lab's state kept, libvirtd left running: a second `down` can finish
            raise VmLabError(
                f"libvirt still has {', '.join(left)} after vagrant destroy and virsh "
                "undefine: stop what holds it (a vagrant process), then run "
                "`gpunode vm-lab down` again"
            )
        for network in (MGMT_NETWORK, PRIVATE_NETWORK):
            _virsh("net-destroy", network)
            _virsh("net-undefine", network)
        box_volume = BOX_PREFIX.replace("/", "-VAGRANTSLASH-")  # the box, uploaded once
        for volume in _virsh("vol-list", "default").stdout.split():
            if volume.startswith(box_volume):
                _virsh("vol-delete", "--pool", "default", volume)
        listed = _virsh("vol-list", "default").stdout.strip().splitlines()
        if state.get("pool_made") and len(listed) <= 2:  # the header only: the pool is ours
            _virsh("pool-destroy", "default")
            _virsh("pool-undefine", "default")
    for key, needle in (("proxy_pid", "tinyproxy"), ("libvirtd_pid", "libvirtd")):
        if lab.pid_alive(state.get(key, 0), needle):
            lab._stop_pid(state[key])
    if state.get("libvirtd_pid") and not libvirt_answers():
        remove_libvirt_chains()
    if lab.pid_alive(state.get("virtlogd_pid", 0), "virtlogd"):
        lab._stop_pid(state["virtlogd_pid"])
    shutil.rmtree(settings.state_dir, ignore_errors=True)
    shutil.rmtree(REPO_ROOT / ".vagrant", ignore_errors=True)


# The chains libvirt 9's network driver adds (iptables, both families), and where it jumps
# to them from; they stay, empty, after its last network is gone
LIBVIRT_CHAINS = {
    "filter": (
        ("INPUT", "LIBVIRT_INP"),
        ("OUTPUT", "LIBVIRT_OUT"),
        ("FORWARD", "LIBVIRT_FWX"),
        ("FORWARD", "LIBVIRT_FWI"),
        ("FORWARD", "LIBVIRT_FWO"),
    ),
    "nat": (("POSTROUTING", "LIBVIRT_PRT"),),
    "mangle": (("POSTROUTING", "LIBVIRT_PRT"),),
}


def remove_libvirt_chains() -> None:
    """The LIBVIRT_* chains and the jumps to them, once the libvirtd this lab started is
    gone (a libvirtd of the machine's own keeps them)."""
    for tool in ("iptables", "ip6tables"):
        if not _which(tool):
            continue
        for table, jumps in LIBVIRT_CHAINS.items():
            for parent, chain in jumps:
                lab._run([tool, "-w", "-t", table, "-D", parent, "-j", chain], check=False)
            for chain in dict.fromkeys(chain for _, chain in jumps):
                lab._run([tool, "-w", "-t", table, "-F", chain], check=False)
                lab._run([tool, "-w", "-t", table, "-X", chain], check=False)


def status(settings: VmLabSettings) -> tuple[bool, list[str]]:
    state = _load_state(settings)
    if not state:
        return False, ["the VM lab is down (sudo make vm-lab)"]
    lines = [f"box {state.get('box', '?')}, key {state.get('key', '?')}"]
    ok = libvirt_answers()
    lines.append(f"libvirtd {'running' if ok else 'not answering'}")
    if ok:
        listed = _virsh("list", "--all").stdout.strip().splitlines()[2:]
        lines += [f"  {line.strip()}" for line in listed]
    proxy = lab.pid_alive(state.get("proxy_pid", 0), "tinyproxy")
    lines.append(f"proxy {state.get('proxy', '?')} {'running' if proxy else 'down'}")
    return ok and proxy, lines
