"""Provision a GPU inference node: the roles in order.

    pyinfra -y inventories/prod.py deploys/gpu_node.py

Each role is a pyinfra @deploy in roles/; later roles (GPU stack, secrets,
hardening, inference) plug in below, in the order they depend on each other.
"""

from pyinfra import host

from gpunode import pipeline
from gpunode.facts.seal import proven
from gpunode.operations.server import notice, stage_uploads_as_login
from roles.base import base
from roles.cuda import cuda
from roles.firewall import firewall
from roles.gateway import gateway
from roles.gpu_probe import gpu_probe
from roles.hardening import hardening
from roles.inference_systemd import inference_systemd
from roles.monitoring import monitoring
from roles.nvidia_driver import nvidia_driver
from roles.provenance import provenance
from roles.seal import seal
from roles.secrets import secrets

pipeline.install()  # fact reads pipelined: gpunode/pipeline.py

verdict = proven(host)  # one command: the node's seal (docs/performance.md; GPUNODE_SEAL=0: off)
if verdict.proven:
    notice(
        name="Drift seal",
        message=f"converged: its seal holds ({verdict.entries} checks): nothing to plan",
    )
else:
    stage_uploads_as_login()  # with sudo: in the login's own temporary directory
    base()
    firewall()
    hardening()
    nvidia_driver()
    cuda()
    gpu_probe()
    secrets()
    monitoring()
    inference_systemd()
    gateway()  # after the services it fronts
    provenance()  # records what the roles above recorded
    # last: AIDE takes this run's changes in, then the seal records what this run's facts saw
    # (the next run of a converged node: one command)
    seal()
