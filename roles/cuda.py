"""CUDA role: the CUDA toolkit, the NVIDIA Container Toolkit and DCGM.

Runs after :func:`roles.nvidia_driver.nvidia_driver` (which sets up NVIDIA's CUDA
repository for ``nvidia.source: nvidia``). Everything it reads is in
``NodeConfig.cuda`` and ``NodeConfig.nvidia`` (gpunode/nvidia.py): the toolkit version
(checked against the driver branch at config load), the container toolkit's version
(its four packages pinned together) and DCGM.

* Source ``nvidia``: ``cuda-toolkit-X-Y`` (under /usr/local/cuda-X.Y), DCGM
  ``datacenter-gpu-manager-4-cudaX`` with the ``nvidia-dcgm`` service.
* Source ``distro``: the distro's ``nvidia-cuda-toolkit``; DCGM and the container
  toolkit are not in distro archives (skipped with a notice unless asked for).
* ``/etc/profile.d/gpunode-cuda.sh`` puts the toolkit on PATH (CUDA_HOME).
* Everything installed is held like the driver (apt-mark hold / dnf versionlock).
* The container toolkit's signing key is pinned (``gpunode.nvidia.NVIDIA_KEYS``) and its
  keyring checked on every run: one with any other key stops the host before the
  repository file is written.

.. code:: python

    from roles.cuda import cuda
    cuda()
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.deb import DebPackages
from pyinfra.operations import apt, dnf, files, systemd

from gpunode import nvidia as nv
from gpunode.facts.nvidia import NvidiaHost
from gpunode.inventory import node_and_distro
from gpunode.nvidia import container_toolkit_packages, toolkit
from gpunode.operations.keys import pinned_keyring
from gpunode.operations.nvidia import hold_packages
from gpunode.operations.packages import apt_update
from gpunode.operations.server import notice
from gpunode.paths import template
from gpunode.provenance import record
from gpunode.schema import distros
from gpunode.schema.node import NodeConfig
from roles.nvidia_driver import gpu_gate


@deploy("gpunode cuda")
def cuda() -> None:
    config, spec = node_and_distro(host)
    state = host.get_fact(NvidiaHost)
    if not gpu_gate(config, state, "CUDA"):
        return
    gpu_present = bool(state["gpus"]) and not state["container"]
    installs = []
    repo = _container_toolkit_repo(config, spec) if nv.wants_container_toolkit(config) else []
    if repo is None:
        return  # the container toolkit's keyring holds keys other than the pinned one: failed
    packages: list[str] = []
    version = nv.cuda_version(config)
    cuda_home = None
    if config.cuda.toolkit:
        toolkit_packages, cuda_home = toolkit(config)
        packages += toolkit_packages
    if nv.wants_container_toolkit(config):
        packages += container_toolkit_packages(config, spec.family)
    else:
        notice(
            name="NVIDIA Container Toolkit",
            message="not installed (cuda.container_toolkit; not in the distro's archive)",
        )
    dcgm = nv.wants_dcgm(config)
    if dcgm:
        packages.append(nv.DCGM_PACKAGE.format(major=nv.cuda_major_minor(version)[0]))
    else:
        notice(name="DCGM", message="not installed (cuda.dcgm; not in the distro's archive)")

    if spec.family == "apt":
        installed = host.get_fact(DebPackages)
        missing = any(p.split("=")[0] not in installed for p in packages)
        apt_update(
            name="Refresh apt package lists",
            _if=lambda: missing or any(op.did_change() for op in repo),
        )
        installs.append(apt.packages(name="CUDA packages", packages=packages, no_recommends=True))
    else:
        installs.append(dnf.packages(name="CUDA packages", packages=packages))

    if cuda_home:
        files.template(
            name="CUDA on PATH",
            src=template("nvidia/cuda-profile.sh.j2"),
            dest=nv.CUDA_PROFILE,
            mode="644",
            cuda_home=cuda_home,
            user="root",
            group="root",
        )
    else:
        files.file(name="CUDA on PATH (none)", path=nv.CUDA_PROFILE, present=False)

    patterns = nv.FAMILIES[spec.family].hold
    hold_packages(name="Hold CUDA packages", family=spec.family, patterns=patterns)
    hold_packages(
        name="Hold newly installed CUDA packages",
        family=spec.family,
        patterns=patterns,
        after_install=True,
        _if=installs[0].did_change,
    )
    if dcgm:
        systemd.service(
            name="DCGM",
            service=f"{nv.DCGM_SERVICE}.service",
            running=True if gpu_present else None,
            enabled=True,
        )
    record(
        "cuda",
        {
            "toolkit": version if config.cuda.toolkit else None,
            "source": config.nvidia.source,
            "container_toolkit": (
                config.cuda.container_toolkit_version
                if nv.wants_container_toolkit(config)
                else None
            ),
            "dcgm": dcgm,
        },
    )


def _container_toolkit_repo(config: NodeConfig, spec: distros.DistroSpec) -> list | None:
    """The container toolkit's repository and its pinned key; returns the operations whose
    change needs an apt update, or None when the host failed (the keyring on it holds keys
    other than the pinned one)."""
    base = (config.cuda.container_toolkit_mirror or nv.CONTAINER_TOOLKIT_REPO).rstrip("/")
    if base.startswith("http://"):
        notice(
            name="Warning: NVIDIA Container Toolkit mirror over plain http "
            "(cuda.container_toolkit_mirror_allow_http)",
            message="packages are checked against the pinned key; the transport is not private",
        )
    apt_family = spec.family == "apt"
    keyring = nv.CONTAINER_TOOLKIT_KEYRING if apt_family else nv.CONTAINER_TOOLKIT_RPM_KEYRING
    key = pinned_keyring(
        what="NVIDIA Container Toolkit repository key",
        src=f"{base}/{nv.CONTAINER_TOOLKIT_KEY}",
        path=keyring,
        fingerprints=nv.NVIDIA_KEYS[nv.CONTAINER_TOOLKIT_KEY],
        family=spec.family,
    )
    if key is None:
        return None
    if apt_family:
        return [
            key,
            files.template(
                name="NVIDIA Container Toolkit repository",
                src=template("nvidia/nvidia-container-toolkit.list.j2"),
                dest="/etc/apt/sources.list.d/nvidia-container-toolkit.list",
                mode="644",
                base=base,
                keyring=keyring,
                user="root",
                group="root",
            ),
        ]
    files.template(
        name="NVIDIA Container Toolkit repository",
        src=template("nvidia/nvidia-container-toolkit.repo.j2"),
        dest="/etc/yum.repos.d/nvidia-container-toolkit.repo",
        mode="644",
        base=base,
        gpgkey=f"file://{keyring}",
        user="root",
        group="root",
    )
    return []
