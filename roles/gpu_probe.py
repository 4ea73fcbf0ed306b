"""GPU probe role: install ``gpunode-probe`` and hold the node to ``gpu.required``.

Installs gpunode/probe.py as ``/usr/local/sbin/gpunode-probe`` and nvidia-ml-py's
single module ``pynvml.py`` (taken from the controller's own installed package, so
nodes need neither pip nor a network) in ``/usr/local/lib/gpunode/``, with its bytecode
compiled by the node's python3 (hash-checked: never stale). It installs on
every host, GPU-less ones included (two small files; the probe then says "no GPU"
with exit code 2), so `gpunode verify` and inference units find the same tool everywhere.

Then it reads the ``GpuProbe`` fact (one command): a host that surely has no NVIDIA GPU
fails with a clear message when ``gpu.required`` is true, and shows a visible skip
otherwise.

.. code:: python

    from roles.gpu_probe import gpu_probe
    gpu_probe()
"""

from __future__ import annotations

import hashlib

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import apt, dnf, files

from gpunode import probe
from gpunode.facts.nvidia import GpuProbe
from gpunode.gpus import PROBE_SOURCE, pynvml_source, sees_no_gpu
from gpunode.inventory import node_and_distro
from gpunode.operations.server import fail, notice, python_bytecode


@deploy("gpunode GPU probe")
def gpu_probe() -> None:
    config, spec = node_and_distro(host)
    packages = apt.packages if spec.family == "apt" else dnf.packages
    packages(name="python3 for the GPU probe", packages=["python3"])
    files.directory(
        name="gpunode library folder",
        path=probe.LIB_DIR,
        user="root",
        group="root",
        mode="755",
    )
    files.put(
        name="nvidia-ml-py for the GPU probe",
        src=str(pynvml_source()),
        dest=f"{probe.LIB_DIR}/pynvml.py",
        user="root",
        group="root",
        mode="644",
    )
    # the probe imports pynvml at each start (every fact read, gate and drift check): its
    # bytecode, compiled on the node and checked against the source on every import, saves
    # compiling 300 KiB of Python each time
    files.directory(
        name="gpunode library bytecode folder",
        path=f"{probe.LIB_DIR}/__pycache__",
        user="root",
        group="root",
        mode="755",
    )
    python_bytecode(
        name="nvidia-ml-py bytecode for the GPU probe",
        path=f"{probe.LIB_DIR}/pynvml.py",
        source_sha256=hashlib.sha256(pynvml_source().read_bytes()).hexdigest(),
    )
    files.put(
        name="GPU probe",
        src=str(PROBE_SOURCE),
        dest=probe.PROBE_PATH,
        user="root",
        group="root",
        mode="755",
    )
    report = host.get_fact(GpuProbe)
    if not sees_no_gpu(report):
        return
    if config.gpu.required:
        fail(
            name="Check the node has a GPU",
            message=(
                f"host {host.name}: gpu.required is true but the host has no NVIDIA GPU "
                f"({report['error'] or 'none on the PCI bus'}) (allowed: a host with an "
                "NVIDIA GPU, or gpu.required: false for a GPU-less host)"
            ),
        )
    else:
        notice(
            name="GPU stack",
            message="no NVIDIA GPU on this host (gpu.required is false): GPU checks skipped",
        )
