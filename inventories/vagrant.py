"""The Vagrant dev lab (see the Vagrantfile): vagrant.yml plus the SSH files of each VM.

    vagrant up --provider=libvirt
    pyinfra -y --sudo inventories/vagrant.py deploys/gpu_node.py

With `vagrant up --provider=virtualbox`, run pyinfra with GPUNODE_VAGRANT_PROVIDER=virtualbox.
Each VM's key and known_hosts live in its Vagrant data folder, so `vagrant destroy`
forgets both and a rebuilt VM's new host key is accepted, not refused.

While the VM lab of this machine is up (`sudo make vm-lab`, gpunode/commands/vmlab.py), its
state file gives the key of the box built here and the proxy its VMs reach the Debian
archive through (they have no other way out): base.apt_proxy is set to it.
"""

import json
import os
from pathlib import Path

from gpunode.config import read_yaml
from gpunode.inventory import fail, from_dict, yaml_path_for
from gpunode.schema.types import ConfigError

_provider = os.environ.get("GPUNODE_VAGRANT_PROVIDER", "libvirt")
if _provider not in ("libvirt", "virtualbox"):
    fail(ConfigError(f"GPUNODE_VAGRANT_PROVIDER={_provider!r} (allowed: libvirt, virtualbox)"))

_yml = yaml_path_for(__file__)
try:
    _doc = read_yaml(_yml)
except ConfigError as _exc:
    fail(_exc)

# Where Vagrant keeps its state, relative to the Vagrantfile (VAGRANT_DOTFILE_PATH moves it).
_dotfile_path = os.environ.get("VAGRANT_DOTFILE_PATH", ".vagrant")
_repo = Path(__file__).resolve().parent.parent
_machines = _repo / _dotfile_path / "machines"
_vm_lab_state = Path(os.environ.get("GPUNODE_VM_LAB_DIR") or _repo / ".lab" / "vm") / "state.json"
_vm_lab: dict = {}
if _provider == "libvirt" and _vm_lab_state.exists():
    try:
        _vm_lab = json.loads(_vm_lab_state.read_text())
    except (OSError, ValueError) as _exc:
        fail(ConfigError(f"{_vm_lab_state}: {_exc} (remove it, or: sudo make vm-lab-down)"))
if _vm_lab.get("proxy") and isinstance(_doc, dict):
    _defaults = _doc.setdefault("defaults", {}) or {}
    _defaults.setdefault("base", {})["apt_proxy"] = _vm_lab["proxy"]
for _name, _host in ((_doc or {}).get("hosts") or {}).items():
    _connection = (_host or {}).get("connection") or {}
    _key = _vm_lab.get("key") or str(_machines / _name / _provider / "private_key")
    _connection["key_file"] = _key
    _connection["known_hosts_file"] = str(_machines / _name / _provider / "known_hosts")

_gpunode = from_dict(_doc, f"{_yml} (provider {_provider})")
globals().update(_gpunode.pyinfra_groups())
