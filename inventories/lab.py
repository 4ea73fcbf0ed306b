"""The lab's hosts (read from `gpunode lab up`'s state) with the settings in lab.yml.

gpunode lab up --hosts 2
pyinfra -y inventories/lab.py deploys/gpu_node.py
"""

from gpunode.commands.lab import LabError, inventory_spec
from gpunode.inventory import from_dict

try:
    _gpunode = from_dict(*inventory_spec())
except LabError as _exc:
    raise SystemExit(f"gpunode: {_exc}") from None

globals().update(_gpunode.pyinfra_groups())
