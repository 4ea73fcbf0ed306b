"""An example production inventory: the hosts and settings are in example.yml beside it.

pyinfra -y inventories/example.py deploys/gpu_node.py
"""

from gpunode.inventory import from_yaml

_gpunode = from_yaml(__file__)
globals().update(_gpunode.pyinfra_groups())
