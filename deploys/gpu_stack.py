"""Only the GPU stack (base, NVIDIA driver, CUDA): for GPU hosts and images.

pyinfra -y inventories/prod.py deploys/gpu_stack.py
"""

from roles.base import base
from roles.cuda import cuda
from roles.nvidia_driver import nvidia_driver

base()
nvidia_driver()
cuda()
