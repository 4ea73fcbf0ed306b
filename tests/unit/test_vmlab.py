"""The VM lab's pieces that need no VM (gpunode/commands/vmlab.py): the box's name follows its
inputs, its metadata is what vagrant-libvirt reads, the proxy's address comes from
inventories/vagrant.yml, bad settings are refused with what is allowed, inventories/vagrant.py
takes the key and the proxy from the lab's state file, and the Vagrantfile (run by the real
vagrant) accepts the local box and refuses an unknown accelerator.

The VMs themselves (`sudo make vm-lab`) are measured in docs/lab.md."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpunode import firewall
from gpunode.commands import vmlab
from gpunode.inventory import load_inventory_file
from gpunode.paths import REPO_ROOT

STAMP = {"version": 2, "suite": "bookworm", "include": ["systemd"]}
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBox gpunode-vm-lab"


def test_the_boxs_name_is_a_digest_of_every_input() -> None:
    inputs = vmlab.box_inputs(STAMP, KEY)
    name = vmlab.box_name(inputs)
    assert name.startswith("gpunode/debian12-") and len(name) == len("gpunode/debian12-") + 12
    assert vmlab.box_name(vmlab.box_inputs(dict(STAMP), KEY)) == name  # stable
    changed: list[dict[str, Any]] = [
        vmlab.box_inputs({**STAMP, "version": 3}, KEY),  # a new base image
        vmlab.box_inputs(STAMP, KEY.replace("Box", "Bax")),  # another machine's key
    ]
    for key in ("version", "packages", "disk_gib", "vagrantfile", "boot", "host_keys_unit"):
        other = dict(inputs)
        other[key] = "something else"
        changed.append(other)
    names = {vmlab.box_name(c) for c in changed}
    assert name not in names and len(names) == len(changed)


def test_the_box_boots_the_vms_own_kernel_through_uefi_and_grub() -> None:
    assert vmlab.box_metadata() == {"provider": "libvirt", "format": "qcow2", "virtual_size": 20}
    assert 'libvirt.loader = "/usr/share/ovmf/OVMF.fd"' in vmlab.BOX_VAGRANTFILE
    assert "kernel" not in vmlab.BOX_VAGRANTFILE  # no direct kernel boot from the host's files
    # GRUB loads what the VM keeps up to date itself, from the file system labelled root
    assert vmlab.GRUB_CFG.splitlines()[2:] == [
        "search --no-floppy --label root --set=root",
        "linux /vmlinuz root=LABEL=root rw console=ttyS0 net.ifnames=0 biosdevname=0",
        "initrd /initrd.img",
        "boot",
    ]
    assert "ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key" in vmlab.HOST_KEYS_UNIT


def test_the_box_disk_has_an_efi_partition_and_the_root_file_system(tmp_path: Path) -> None:
    """make_disk with the real sfdisk, mkfs.fat, mtools and mkfs.ext4 (no loop device): the
    partition table, the boot loader where UEFI looks for it, the tree in the root file system."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text("debian12\n")
    loader = tmp_path / "BOOTX64.EFI"
    loader.write_bytes(b"MZ-a boot loader")
    disk = tmp_path / "disk.raw"
    vmlab.make_disk(disk, root, loader, gib=1)
    assert disk.stat().st_size == 1 << 30

    def run(*argv: str) -> str:
        return subprocess.run(argv, check=True, capture_output=True, text=True).stdout

    table = json.loads(run("sfdisk", "--json", str(disk)))["partitiontable"]
    assert table["label"] == "gpt"
    esp, rootfs = table["partitions"]
    assert esp["type"] == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"  # EFI system partition
    assert (esp["start"], esp["size"]) == (2048, 64 * 2048)
    assert rootfs["type"] == "0FC63DAF-8483-4772-8E79-3D69D8477DE4"  # Linux file system
    assert rootfs["start"] == 65 * 2048 and rootfs["start"] + rootfs["size"] <= 2097152 - 33
    assert "No errors detected" in run("sfdisk", "--verify", str(disk))
    copied = tmp_path / "copied.efi"
    run("mcopy", "-i", f"{disk}@@1M", "::/EFI/BOOT/BOOTX64.EFI", str(copied))
    assert copied.read_bytes() == b"MZ-a boot loader"
    part = f"{disk}?offset={rootfs['start'] * 512}"  # e2fsprogs reads a file at an offset
    assert "Filesystem volume name:   root" in run("dumpe2fs", "-h", part)
    blocks = int(run("dumpe2fs", "-h", part).split("Block count:")[1].split()[0])
    assert blocks * 4096 == rootfs["size"] * 512  # the file system fills its partition
    assert run("debugfs", "-R", "cat /etc/hostname", part) == "debian12\n"


def test_the_proxy_listens_on_the_private_networks_host_address() -> None:
    assert vmlab.private_gateway() == ("192.168.56.1", "192.168.56.0/24")


def test_vms_on_two_networks_are_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    doc = yaml.safe_load((REPO_ROOT / "inventories/vagrant.yml").read_text())
    doc["hosts"]["gpu-02"]["connection"]["address"] = "192.168.57.12"
    path = tmp_path / "vagrant.yml"
    path.write_text(yaml.safe_dump(doc))
    monkeypatch.setattr(vmlab, "VAGRANT_INVENTORY", path)
    with pytest.raises(vmlab.VmLabError) as exc:
        vmlab.private_gateway()
    assert str(exc.value) == (
        f"{path}: the VMs' addresses span 2 /24 networks (allowed: one, the private network)"
    )


@pytest.mark.parametrize("port", ["80", "70000", "88;x", ""])
def test_a_bad_proxy_port_is_refused(monkeypatch: pytest.MonkeyPatch, port: str) -> None:
    monkeypatch.setenv("GPUNODE_VM_LAB_PROXY_PORT", port)
    with pytest.raises(vmlab.VmLabError) as exc:
        vmlab.VmLabSettings.from_env()
    assert str(exc.value) == f"GPUNODE_VM_LAB_PROXY_PORT={port!r} (allowed: 1024-65535)"


def test_the_vagrant_inventory_takes_the_labs_key_and_proxy(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("GPUNODE_VAGRANT_PROVIDER", raising=False)
    monkeypatch.setattr(firewall, "controller_source", lambda address, port: None)
    monkeypatch.setenv("GPUNODE_VM_LAB_DIR", str(tmp_path))
    state = {"key": "/var/cache/gpunode/vmbox/vagrant_ed25519", "proxy": "http://192.168.56.1:8898"}
    (tmp_path / "state.json").write_text(json.dumps(state))
    inventory = load_inventory_file(REPO_ROOT / "inventories/vagrant.py")
    for name, host in inventory.hosts.items():
        assert host.connection.key_file == state["key"]
        assert host.config.base.apt_proxy == state["proxy"]
        machines = REPO_ROOT / ".vagrant" / "machines" / name / "libvirt"
        assert host.connection.known_hosts_file == str(machines / "known_hosts")
    (tmp_path / "state.json").unlink()  # the lab is down: Vagrant's own key, no proxy
    host = load_inventory_file(REPO_ROOT / "inventories/vagrant.py").hosts["gpu-01"]
    assert host.connection.key_file.endswith("/.vagrant/machines/gpu-01/libvirt/private_key")
    assert host.config.base.apt_proxy is None


def test_a_broken_state_file_stops_the_inventory_naming_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GPUNODE_VM_LAB_DIR", str(tmp_path))
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(SystemExit):
        load_inventory_file(REPO_ROOT / "inventories/vagrant.py")
    err = capsys.readouterr().err
    assert f"{tmp_path / 'state.json'}: " in err and "sudo make vm-lab-down" in err


def _vagrant(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    vagrant = shutil.which("vagrant")
    if vagrant is None:
        if os.environ.get("CI") == "true":
            pytest.fail("vagrant is not installed (make deps installs it)")
        pytest.skip("vagrant is not installed")
    run_env = {
        **os.environ,
        "VAGRANT_CHECKPOINT_DISABLE": "1",
        "VAGRANT_DOTFILE_PATH": str(tmp_path / ".vagrant"),
        "VAGRANT_HOME": str(tmp_path / "home"),
        **env,
    }
    return subprocess.run(
        [vagrant, "validate", "--ignore-provider"],
        cwd=REPO_ROOT,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_vagrantfile_takes_the_local_box(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("not read by validate\n")
    done = _vagrant(
        tmp_path,
        GPUNODE_VAGRANT_BOX="gpunode/debian12-0123456789ab",
        GPUNODE_VAGRANT_KEY=str(key),
        GPUNODE_VAGRANT_ACCEL="qemu",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Vagrantfile validated successfully" in done.stdout


def test_the_vagrantfile_refuses_an_unknown_accelerator(tmp_path: Path) -> None:
    done = _vagrant(tmp_path, GPUNODE_VAGRANT_ACCEL="xen")
    assert done.returncode != 0
    assert 'GPUNODE_VAGRANT_ACCEL="xen" (allowed: kvm, qemu)' in done.stdout + done.stderr


def test_verify_runs_the_checks_through_sudo_for_a_login_other_than_root(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The Vagrant VMs log in as `vagrant` (deploys run with --sudo): the host checks read
    root-only files and call sysctl, so they run through sudo too; a root login needs none."""
    from gpunode.commands.verify import host_checks_argv

    monkeypatch.setattr(firewall, "controller_source", lambda address, port: None)
    monkeypatch.setenv("GPUNODE_VM_LAB_DIR", str(tmp_path))
    vagrant = load_inventory_file(REPO_ROOT / "inventories/vagrant.py").hosts["gpu-01"]
    argv = host_checks_argv(vagrant, tmp_path / "ssh_config", tmp_path, tmp_path / "j.xml")
    assert argv[-1] == "--sudo" and argv.count("--sudo") == 1
    root = vagrant.model_copy(
        update={"connection": vagrant.connection.model_copy(update={"user": "root"})}
    )
    assert "--sudo" not in host_checks_argv(root, tmp_path / "c", tmp_path, tmp_path / "j.xml")


class FakeLibvirt:
    """virsh against a libvirt holding ``domains`` (name -> undefine works) and ``volumes``
    in the default pool; every call recorded."""

    def __init__(self, domains: dict[str, bool], volumes: set[str]) -> None:
        self.domains, self.volumes, self.calls = dict(domains), set(volumes), []

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        self.calls.append(args)
        verb, rest = args[0], args[1:]
        rc, out = 0, ""
        if verb == "dominfo":
            rc = 0 if rest[0] in self.domains else 1
        elif verb == "undefine":
            name = rest[-1]
            if name in self.domains and self.domains[name]:
                del self.domains[name]
                self.volumes.discard(f"{name}.img")
            else:
                rc = 1
        elif verb == "vol-list":
            out = " Name   Path\n----\n" + "".join(f" {v}  /x/{v}\n" for v in sorted(self.volumes))
        elif verb == "vol-delete":
            self.volumes.discard(rest[-1])
        return subprocess.CompletedProcess(["virsh", *args], rc, out, "")


def test_down_removes_what_an_interrupted_up_left_in_libvirt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A `vagrant up` killed midway: gpu-01 defined, gpu-02's disk made, no vagrant state
    (seen 2026-12-05: `vagrant destroy` refused, the machines locked by the killed up)."""
    domains = vmlab.lab_domains()
    assert domains == [f"{REPO_ROOT.name}_gpu-01", f"{REPO_ROOT.name}_gpu-02"]
    other = "someone_elses_vm"
    virsh = FakeLibvirt(
        {domains[0]: True, other: True}, {f"{domains[0]}.img", f"{domains[1]}.img", "keep.img"}
    )
    monkeypatch.setattr(vmlab, "_virsh", virsh)
    assert vmlab.remove_domains(domains) == []
    assert set(virsh.domains) == {other}
    assert virsh.volumes == {"keep.img"}
    assert ("destroy", domains[0]) in virsh.calls
    assert not [c for c in virsh.calls if other in c]


def test_down_stops_naming_a_vm_libvirt_keeps_and_keeps_the_labs_state(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    domains = vmlab.lab_domains()
    virsh = FakeLibvirt({domains[1]: False}, set())
    monkeypatch.setattr(vmlab, "_virsh", virsh)
    monkeypatch.setattr(vmlab, "libvirt_answers", lambda: True)
    monkeypatch.setattr(vmlab, "vagrant", lambda *a, **k: 1)  # destroy failed
    settings = vmlab.VmLabSettings(state_dir=tmp_path / "vm", cache_dir=tmp_path / "cache")
    settings.state_dir.mkdir()
    settings.state_file.write_text('{"box": "b", "libvirtd_pid": 1}')
    with pytest.raises(vmlab.VmLabError) as err:
        vmlab.down(settings)
    assert str(err.value) == (
        f"libvirt still has {domains[1]} after vagrant destroy and virsh undefine: stop what "
        "holds it (a vagrant process), then run `gpunode vm-lab down` again"
    )
    assert settings.state_file.exists()
