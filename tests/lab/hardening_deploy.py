"""The roles tests/lab/test_hardening.py exercises: base (package proxy), firewall, hardening.

In deploys/gpu_node.py they run in this order too; this file leaves out the GPU, secrets and
inference roles so the lab test converges and re-runs quickly.
"""

from roles.base import base
from roles.firewall import firewall
from roles.hardening import file_integrity, hardening

base()
firewall()
hardening()
file_integrity()
