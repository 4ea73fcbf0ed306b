"""Only the GPU stack (base, NVIDIA driver, CUDA): for GPU hosts and images.

pyinfra -y inventories/prod.py deploys/gpu_stack.py
"""

from gpunode import pipeline
from gpunode.operations.server import stage_uploads_as_login
from roles.base import base
from roles.cuda import cuda
from roles.hardening import file_integrity
from roles.nvidia_driver import nvidia_driver

pipeline.install()  # fact reads pipelined: gpunode/pipeline.py
stage_uploads_as_login()  # with sudo: in the login's own temporary directory

base()
nvidia_driver()
cuda()
file_integrity()  # this run's changes into AIDE's database (none: nothing runs)
