"""The shipped inventories (example, vagrant) and the Vagrantfile: they load, validate and agree."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from gpunode import firewall
from gpunode.config import read_yaml
from gpunode.inventory import load_inventory_file
from gpunode.paths import REPO_ROOT
from gpunode.schema.node import Inventory

INVENTORIES = REPO_ROOT / "inventories"
DOC_NETS = [  # RFC 5737 and RFC 3849 documentation ranges
    ipaddress.ip_network(n)
    for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
]


def _is_documentation(value: str) -> bool:
    net = ipaddress.ip_network(value)
    return any(net.version == doc.version and net.subnet_of(doc) for doc in DOC_NETS)  # type: ignore[arg-type]


def _require(tool: str, path: str | None) -> str:
    """The tool's path; without it, skip on a workstation but fail in CI, which must have it."""
    if path:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail(
            f"`{tool}` not found on PATH, and CI=true: CI must install Vagrant (and the "
            "`ruby` it runs on) so the Vagrantfile is checked",
            pytrace=False,
        )
    pytest.skip(f"`{tool}` not found on PATH (in CI, with CI=true, this is a failure)")


def _pyinfra_inventory(path: Path):
    """The inventory exactly as the pyinfra CLI loads it (module-level lists become groups)."""
    from pyinfra.api import Config, State
    from pyinfra.api import Inventory as PyinfraInventory
    from pyinfra.context import ctx_state
    from pyinfra_cli.inventory import make_inventory

    with ctx_state.use(State(PyinfraInventory(([], {})), Config())):
        return make_inventory(str(path), cwd=str(REPO_ROOT))


# --- inventories/example.py + example.yml ---------------------------------------


@pytest.fixture(scope="module")
def example() -> Inventory:
    return load_inventory_file(INVENTORIES / "example.py")


def test_example_py_is_example_yml(example: Inventory) -> None:
    assert load_inventory_file(INVENTORIES / "example.yml") == example


def test_example_hosts_and_groups(example: Inventory) -> None:
    assert list(example.hosts) == ["gpu-01", "gpu-02", "cpu-01"]
    assert example.groups == {
        "gpu_nodes": ("gpu-01", "gpu-02"),
        "h100": ("gpu-02",),
        "ungrouped": ("cpu-01",),
    }
    distros = {name: host.config.distro for name, host in example.hosts.items()}
    assert distros == {"gpu-01": "ubuntu2204", "gpu-02": "ubuntu2404", "cpu-01": "rhel9"}


def test_example_merges_defaults_groups_and_hosts(example: Inventory) -> None:
    gpu01, gpu02, cpu01 = (example.hosts[h].config for h in ("gpu-01", "gpu-02", "cpu-01"))
    # The h100 group's driver settings reach its host, over the defaults' branch 570;
    # the host's own pin merges into them.
    assert (gpu02.nvidia.branch, gpu02.nvidia.kernel_modules) == ("580", "open")
    assert gpu02.nvidia.version == "580.95.05"
    assert (gpu02.gpu.required, gpu02.gpu.count) == (True, 8)
    assert gpu02.base.packages == ["jq", "tmux", "infiniband-diags", "rdma-core"]  # lists replace
    # Host data wins over the defaults; the other hosts keep the defaults.
    assert gpu01.distro == "ubuntu2204"
    assert (gpu01.nvidia.branch, gpu01.nvidia.kernel_modules) == ("570", "proprietary")
    assert (gpu01.gpu.required, gpu01.gpu.count) == (True, 4)
    assert gpu01.base.apt_mirror == "http://mirror.example.com/ubuntu"
    assert (cpu01.nvidia.branch, cpu01.gpu.required) == ("570", False)
    assert cpu01.base.hostname == "cpu-01-inference"
    # Defaults reach every host; mappings merge key by key.
    for config in (gpu01, gpu02, cpu01):
        assert config.base.apt_proxy == "http://proxy.example.com:3128"
        assert [u.name for u in config.base.admin_users] == ["alice", "bob", "carol"]
        assert [u.sudo for u in config.base.admin_users] == [True, True, False]
        assert config.base.journald.system_max_use == "4G"
        assert config.base.journald.rate_limit_burst == 10000  # schema default kept
    assert example.hosts["cpu-01"].connection.port == 2222
    assert example.hosts["gpu-02"].connection.port == 22


def test_example_uses_only_documentation_addresses(example: Inventory) -> None:
    for host in example.hosts.values():
        assert _is_documentation(host.connection.address), host.name
        network = host.config.network
        cidrs = [*network.admin_cidrs, *network.app_cidrs, *network.monitoring_cidrs]
        assert cidrs
        assert all(_is_documentation(str(cidr)) for cidr in cidrs), (host.name, cidrs)
        for user in host.config.base.admin_users:
            assert all(key.endswith("@example.com") for key in user.ssh_keys), user.name


def test_example_pyinfra_groups() -> None:
    inventory = _pyinfra_inventory(INVENTORIES / "example.py")
    assert sorted(inventory.groups) == ["example", "gpu_nodes", "h100", "ungrouped"]
    assert [h.name for h in inventory.get_group("h100")] == ["gpu-02"]
    cpu01 = inventory.get_host("cpu-01")
    assert (cpu01.data.ssh_hostname, cpu01.data.ssh_port) == ("198.51.100.21", 2222)
    assert cpu01.data.gpunode.distro == "rhel9"


# --- inventories/vagrant.py + vagrant.yml ---------------------------------------


# The address the machine running Vagrant has on the VMs' private network (Vagrant's
# host-only default). The firewall's anti-lockout check at load asks the kernel which
# source address reaches each VM; this machine has no such network, a Vagrant host does.
VAGRANT_HOST = ipaddress.ip_address("192.168.56.1")


@pytest.fixture
def vagrant_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    monkeypatch.delenv("GPUNODE_VAGRANT_PROVIDER", raising=False)
    monkeypatch.delenv("VAGRANT_DOTFILE_PATH", raising=False)
    # a VM lab up on this machine (sudo make vm-lab) would give its key and proxy: not here
    monkeypatch.setenv("GPUNODE_VM_LAB_DIR", str(tmp_path / "no-vm-lab"))
    monkeypatch.setattr(firewall, "controller_source", lambda address, port: VAGRANT_HOST)
    return monkeypatch


def test_vagrant_yml_hosts() -> None:
    hosts = read_yaml(INVENTORIES / "vagrant.yml")["hosts"]
    assert {name: h["connection"]["address"] for name, h in hosts.items()} == {
        "gpu-01": "192.168.56.11",
        "gpu-02": "192.168.56.12",
    }
    assert all(h["groups"] == ["gpu_nodes"] for h in hosts.values())


@pytest.mark.parametrize("provider", ["libvirt", "virtualbox", None])
def test_vagrant_inventory(vagrant_env: pytest.MonkeyPatch, provider: str | None) -> None:
    if provider:
        vagrant_env.setenv("GPUNODE_VAGRANT_PROVIDER", provider)
    inventory = load_inventory_file(INVENTORIES / "vagrant.py")
    assert inventory.groups == {"gpu_nodes": ("gpu-01", "gpu-02")}
    for name, host in inventory.hosts.items():
        data_dir = REPO_ROOT / ".vagrant" / "machines" / name / (provider or "libvirt")
        assert host.connection.key_file == str(data_dir / "private_key")
        assert host.connection.known_hosts_file == str(data_dir / "known_hosts")
        assert host.connection.user == "vagrant"
        assert host.connection.strict_host_key_checking == "accept-new"
        assert host.config.distro == "debian12"
        assert host.config.gpu.required is False


def test_vagrant_inventory_follows_vagrant_dotfile_path(
    vagrant_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    vagrant_env.setenv("VAGRANT_DOTFILE_PATH", str(tmp_path))
    vagrant_env.setenv("GPUNODE_VAGRANT_PROVIDER", "virtualbox")
    host = load_inventory_file(INVENTORIES / "vagrant.py").hosts["gpu-02"]
    assert host.connection.key_file == str(tmp_path / "machines/gpu-02/virtualbox/private_key")


def test_vagrant_inventory_refuses_unknown_provider(
    vagrant_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    vagrant_env.setenv("GPUNODE_VAGRANT_PROVIDER", "vmware")
    with pytest.raises(SystemExit) as exc:
        load_inventory_file(INVENTORIES / "vagrant.py")
    assert exc.value.code == 2
    assert (
        "GPUNODE_VAGRANT_PROVIDER='vmware' (allowed: libvirt, virtualbox)"
        in capsys.readouterr().err
    )


def test_vagrant_pyinfra_groups(vagrant_env: pytest.MonkeyPatch) -> None:
    inventory = _pyinfra_inventory(INVENTORIES / "vagrant.py")
    assert sorted(inventory.groups) == ["gpu_nodes", "vagrant"]  # no helper leaked as a group
    gpu01 = inventory.get_host("gpu-01")
    assert (gpu01.data.ssh_hostname, gpu01.data.ssh_user) == ("192.168.56.11", "vagrant")
    assert gpu01.data.ssh_key.endswith("/.vagrant/machines/gpu-01/libvirt/private_key")


# --- Vagrantfile ----------------------------------------------------------------

# Runs the Vagrantfile with a stand-in for Vagrant that records each VM's name and
# private_network address: what the Vagrantfile really defines, with no provider.
_RECORD_VMS_RB = """
require "json"
class Recorder
  def initialize(vms, name = nil)
    @vms, @name = vms, name
  end
  def define(name)
    @vms[name] = nil
    yield Recorder.new(@vms, name)
  end
  def network(type, **options)
    @vms[@name] = options[:ip] if type == :private_network
  end
  def method_missing(*)
    self
  end
  def respond_to_missing?(*)
    true
  end
end
module Vagrant
  def self.configure(_version)
    yield Recorder.new(VMS)
  end
end
VMS = {}
load ARGV.fetch(0)
puts JSON.generate(VMS)
"""


def test_vagrantfile_vms_are_vagrant_yml_hosts() -> None:
    vagrant = _require("vagrant", shutil.which("vagrant"))
    # Debian's vagrant runs on the system ruby; HashiCorp's packages embed one.
    embedded = Path("/opt/vagrant/embedded/bin/ruby")
    ruby = _require("ruby", shutil.which("ruby") or (str(embedded) if embedded.exists() else None))
    assert vagrant
    result = subprocess.run(
        [ruby, "-e", _RECORD_VMS_RB, str(REPO_ROOT / "Vagrantfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    hosts = read_yaml(INVENTORIES / "vagrant.yml")["hosts"]
    assert json.loads(result.stdout) == {
        name: host["connection"]["address"] for name, host in hosts.items()
    }


def test_vagrant_validate(tmp_path: Path) -> None:
    vagrant = _require("vagrant", shutil.which("vagrant"))
    env = {
        **os.environ,
        "VAGRANT_CHECKPOINT_DISABLE": "1",  # no version check over the network
        "VAGRANT_DOTFILE_PATH": str(tmp_path / ".vagrant"),  # keep the checkout clean
    }
    for name in ("VAGRANT_CWD", "VAGRANT_VAGRANTFILE"):
        env.pop(name, None)

    def validate(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [vagrant, "validate", *args],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    result = validate()
    output = result.stdout + result.stderr
    if result.returncode != 0 and (
        "isn't usable on this system" in output or "No usable default provider" in output
    ):
        # Neither libvirt nor VirtualBox works here: check all but the provider blocks.
        warnings.warn(
            f"no usable Vagrant provider; validated with --ignore-provider:\n{output}",
            stacklevel=1,
        )
        result = validate("--ignore-provider")
        output = result.stdout + result.stderr
    assert result.returncode == 0, f"vagrant validate failed:\n{output}"
    assert "Vagrantfile validated successfully" in result.stdout


def test_pyinfra_debug_inventory_serialises_the_node_config(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pyinfra", str(INVENTORIES / "example.py"), "debug-inventory"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr  # pyinfra prints the inventory on stderr
    assert '"distro": "ubuntu2204"' in out and '"distro": "rhel9"' in out
