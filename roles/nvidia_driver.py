"""NVIDIA driver role: package source, driver branch, holds, nouveau, services, reboot.

Everything it reads is in ``NodeConfig.nvidia`` (gpunode/nvidia.py, where the defaults
and the distro/source tables live); what it learns from the host comes from one fact
(:class:`gpunode.facts.nvidia.NvidiaHost`).

* Hosts without an NVIDIA device: a visible skip (``nvidia.install: auto``), an error
  (``gpu.required: true``), or an install anyway (``nvidia.install: always``).
* Source ``nvidia``: NVIDIA's CUDA network repository with its signing key pinned (the
  key file next to the repository, checked by fingerprint on every run: a keyring with
  any other key stops the host before the repository file is written; NVIDIA's
  cuda-keyring .deb is not used, and removed where an earlier gpunode installed it), a
  dnf module stream on EL9, EPEL for dkms; ``distro``: the distribution's archive
  (Debian 12 gets a ``non-free`` sources file).
* Installed NVIDIA packages are held (apt-mark hold / dnf versionlock); an exact
  ``nvidia.version`` is pinned with an apt preferences file.
* Kernel headers for the running kernel and dkms; nouveau blacklisted, the initramfs
  rebuilt only when that file changed; nvidia-persistenced enabled; fabric manager where
  NVSwitches are (or config says so).
* Reboot only when the installed module differs from the loaded one, only with
  ``nvidia.reboot: true``, one host at a time, each host's loaded driver checked before
  the next reboots; a host that does not come back or load the driver stops the rollout.
* In a container (the lab): no module build, no initramfs, no reboot - each a notice.

.. code:: python

    from roles.nvidia_driver import nvidia_driver
    nvidia_driver()
"""

from __future__ import annotations

import shlex
from typing import Any

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.rpm import RpmPackages
from pyinfra.operations import apt, dnf, files, server, systemd

from gpunode import nvidia as nv
from gpunode.facts.nvidia import NvidiaHost
from gpunode.inventory import node_and_distro
from gpunode.nvidia import driver_packages, fabricmanager_packages, mirror_base
from gpunode.operations.keys import pinned_keyring
from gpunode.operations.nvidia import dnf_module_stream, hold_packages
from gpunode.operations.packages import apt_update
from gpunode.operations.server import fail, notice, rolling_reboot
from gpunode.paths import template
from gpunode.provenance import record
from gpunode.render import shell_value
from gpunode.schema import distros
from gpunode.schema.node import NodeConfig


def gpu_gate(config: NodeConfig, state: dict[str, Any], what: str) -> bool:
    """Whether the GPU stack goes on this host; otherwise a visible notice or a failure."""
    install = config.nvidia.install
    if install == "never":
        notice(name=f"{what}: skipped", message="nvidia.install: never: skipped")
        return False
    if state["gpus"]:
        return True
    if config.gpu.required:
        fail(
            name=f"{what}: check for an NVIDIA GPU",
            message=(
                f"host {host.name}: gpu.required: true, but no NVIDIA GPU was found "
                "(no NVIDIA device, vendor 10de, on the PCI bus; allowed: fix the hardware, or set "
                "gpu.required: false)"
            ),
        )
        return False
    if install == "auto":
        notice(
            name=f"{what}: no NVIDIA GPU",
            message="no NVIDIA GPU found: skipped (gpu.required: false, nvidia.install: auto)",
        )
        return False
    notice(
        name=f"{what}: no NVIDIA GPU",
        message="no NVIDIA GPU found: installing anyway (nvidia.install: always)",
    )
    return True


@deploy("gpunode nvidia driver")
def nvidia_driver() -> None:
    config, spec = node_and_distro(host)
    family = spec.family
    nvidia = config.nvidia
    state = host.get_fact(NvidiaHost)
    if not gpu_gate(config, state, "NVIDIA driver"):
        return
    in_container = bool(state["container"])
    gpu_present = bool(state["gpus"]) and not in_container

    if state["secure_boot"] and not nvidia.module_signing:
        fail(
            name="Check Secure Boot",
            message=(
                f"host {host.name}: Secure Boot is on, so unsigned NVIDIA modules will not "
                "load (allowed: set nvidia.module_signing: {key_file, cert_file} to an "
                "enrolled MOK, or turn Secure Boot off)"
            ),
        )
        return
    _module_signing(config)

    sources_changed = _sources(config, spec)
    if sources_changed is None:
        return  # a keyring on the host holds keys other than the pinned ones: failed
    _version_pin(config, family)
    driver = _packages(config, spec, state, sources_changed)
    _holds(family, driver)
    _nouveau(family, in_container)
    _services(config, family, state, gpu_present)
    _reboot(config, state, driver, gpu_present, in_container)
    record(
        "nvidia",
        {
            "source": nvidia.source,
            "branch": nvidia.branch,
            "kernel_modules": nvidia.kernel_modules,
            "version": nvidia.version or state["on_disk"] or state["loaded"] or None,
            "loaded": state["loaded"] or None,
        },
    )


def _module_signing(config: NodeConfig) -> None:
    signing = config.nvidia.module_signing
    if signing:
        files.template(
            name="DKMS module signing key",
            src=template("nvidia/dkms-signing.conf.j2"),
            dest=nv.DKMS_SIGNING_CONF,
            mode="644",
            signing=signing,
            sh=shell_value,  # DKMS sources the file as shell
            user="root",
            group="root",
        )
    else:
        files.file(name="DKMS module signing (none)", path=nv.DKMS_SIGNING_CONF, present=False)


def _sources(config: NodeConfig, spec: distros.DistroSpec) -> list[Any] | None:
    """Set up the package source; returns the operations whose change needs an apt update,
    or None when the host failed (a keyring on it holds keys other than the pinned ones)."""
    nvidia = config.nvidia
    assert config.distro
    if nvidia.mirror and nvidia.mirror.startswith("http://"):
        notice(
            name="Warning: NVIDIA mirror over plain http (nvidia.mirror_allow_http)",
            message="packages are still signature-checked; the transport is not private",
        )
    if nvidia.source == "distro":
        archive = nv.DISTRO_ARCHIVES[config.distro]
        if not archive.components or config.base.apt_mirror:
            return []  # the distro's own sources (or base's mirror) carry these components
        archive_url = (nvidia.mirror or nv.DEBIAN_ARCHIVE).rstrip("/")
        security = archive_url.rsplit("/", 1)[0] + "/" + (spec.apt_security_path or "")
        return [
            files.template(
                name="apt sources for the distro's NVIDIA packages",
                src=template("nvidia/distro-components.sources.j2"),
                dest=nv.DEBIAN_NONFREE_SOURCES,
                mode="644",
                spec=spec,
                archive=archive_url,
                security=security if spec.apt_security_path else None,
                components=archive.components,
                user="root",
                group="root",
            )
        ]
    repo = nv.CUDA_REPOS[config.distro]
    url = repo.url(mirror_base(config))
    # NVIDIA's signing key, fetched from next to the repository and pinned: a keyring
    # holding any other key stops the host here, before the repository file is written.
    key = pinned_keyring(
        what="NVIDIA CUDA repository key",
        src=f"{url}/{repo.key}",
        path=repo.keyring,
        fingerprints=nv.NVIDIA_KEYS[repo.key],
        family=repo.family,
    )
    if key is None:
        return None
    if repo.family == "apt":
        # NVIDIA's cuda-keyring .deb (gpunode installed it before 2026-12) would keep a
        # second, package-owned copy of the key and rewrite the sources file on upgrade.
        if nv.CUDA_KEYRING_PACKAGE in host.get_fact(DebPackages):
            apt.packages(
                name="Remove NVIDIA's cuda-keyring package (the key is pinned instead)",
                packages=[nv.CUDA_KEYRING_PACKAGE],
                present=False,
                purge=True,
            )
        listing = files.template(
            name="NVIDIA CUDA repository",
            src=template("nvidia/cuda.list.j2"),
            dest=repo.list_file,
            mode="644",
            keyring=repo.keyring,
            url=url,
            user="root",
            group="root",
        )
        return [key, listing]
    # EPEL (for dkms): its release RPM by URL, or the package in the distro's extras.
    # Checked by name first: dnf.rpm would download the URL again on every run.
    if repo.epel and "epel-release" not in host.get_fact(RpmPackages):
        if repo.epel.startswith("http"):
            # A release RPM from a URL is a local package to dnf, unchecked by default: its
            # signature is checked against EPEL's pinned key (imported once it matched).
            epel_key = pinned_keyring(
                what="EPEL 9 signing key",
                src=nv.EPEL_KEY_URL,
                path=nv.EPEL_KEYRING,
                fingerprints=nv.EPEL_KEY_FINGERPRINTS,
                family=repo.family,
            )
            if epel_key is None:
                return None
            server.shell(
                name="EPEL (dkms): the release RPM, signature-checked with the pinned key",
                commands=[
                    shlex.join(["rpm", "--import", nv.EPEL_KEYRING]),
                    shlex.join(["dnf", "install", "-y", "--setopt=localpkg_gpgcheck=1", repo.epel]),
                ],
            )
        else:
            dnf.packages(name="EPEL (dkms)", packages=[repo.epel])
    dnf.repo(
        name="NVIDIA CUDA repository",
        src=repo.repo_id,
        baseurl=url,
        description=repo.repo_id,
        gpgcheck=True,
        gpgkey=f"file://{repo.keyring}",  # the pinned copy: dnf imports it from there
    )
    return []


def _version_pin(config: NodeConfig, family: str) -> None:
    if family != "apt":
        return  # dnf: the module stream keeps the branch; versionlock keeps the version
    version = config.nvidia.version
    if version:
        files.template(
            name="Pin the NVIDIA driver version",
            src=template("nvidia/apt-pin.j2"),
            dest=nv.APT_PIN_FILE,
            mode="644",
            version=version,
            patterns=nv.FAMILIES["apt"].hold,
            user="root",
            group="root",
        )
    else:
        files.file(name="Pin the NVIDIA driver version (none)", path=nv.APT_PIN_FILE, present=False)


def _packages(
    config: NodeConfig, spec: distros.DistroSpec, state: dict[str, Any], sources: list[Any]
) -> Any:
    """Install headers, dkms, the driver and fabric manager; returns the driver op."""
    family = spec.family
    row = nv.FAMILIES[family]
    nvidia = config.nvidia
    wanted = driver_packages(config, family)
    if nv.wants_fabricmanager(config, state["nvswitches"]):
        packages = fabricmanager_packages(config, family)
        if not packages:
            fail(
                name="Fabric manager",
                message=(
                    f"host {host.name}: the host has NVSwitches but {config.distro}'s archive "
                    "has no fabric manager (allowed: nvidia.source: nvidia, or "
                    "nvidia.fabricmanager: false)"
                ),
            )
        wanted += packages
    build = ["dkms"]
    if state["container"]:
        notice(
            name="Kernel headers",
            message=(
                "in a container: no kernel headers and no module build (the kernel belongs "
                "to the machine underneath)"
            ),
        )
    else:
        build += [p.format(kernel=state["kernel"]) for p in row.headers]
    if family == "apt":
        installed = host.get_fact(DebPackages)
        missing = any(p not in installed for p in [*build, *wanted])
        apt_update(
            name="Refresh apt package lists",
            _if=lambda: missing or any(op.did_change() for op in sources),
        )
        apt.packages(name="Kernel headers and dkms", packages=build, no_recommends=True)
        return apt.packages(name="NVIDIA driver packages", packages=wanted, no_recommends=True)
    dnf.packages(name="Kernel headers, dkms and versionlock", packages=[*build, *row.lock_packages])
    stream = dnf_module_stream(
        name="NVIDIA driver module stream",
        module=nv.DNF_DRIVER_MODULE,
        stream=nvidia.branch + nv.DNF_STREAM_SUFFIX[nvidia.kernel_modules],
    )
    return _AnyChanged(stream, dnf.packages(name="NVIDIA driver packages", packages=wanted))


class _AnyChanged:
    """did_change() of several operations together (the driver on dnf: stream + packages)."""

    def __init__(self, *ops: Any) -> None:
        self.ops = ops

    def did_change(self) -> bool:
        return any(op.did_change() for op in self.ops)


def _holds(family: str, driver: Any) -> None:
    patterns = nv.FAMILIES[family].hold
    hold_packages(name="Hold NVIDIA packages", family=family, patterns=patterns)
    hold_packages(
        name="Hold newly installed NVIDIA packages",
        family=family,
        patterns=patterns,
        after_install=True,
        _if=driver.did_change,
    )


def _nouveau(family: str, in_container: bool) -> None:
    blacklist = files.put(
        name="Blacklist nouveau",
        src=template("nvidia/blacklist-nouveau.conf"),
        dest=nv.NOUVEAU_BLACKLIST,
        mode="644",
        user="root",
        group="root",
    )
    if in_container:
        notice(
            name="Rebuild the initramfs",
            message="in a container: the initramfs belongs to the machine underneath: not rebuilt",
            _if=blacklist.did_change,
        )
        return
    server.shell(
        name="Rebuild the initramfs",
        commands=[nv.FAMILIES[family].initramfs],
        _if=blacklist.did_change,
    )


def _services(config: NodeConfig, family: str, state: dict[str, Any], gpu_present: bool) -> None:
    # Without a GPU (or in a container) the daemons exit at start: enable them only.
    running = True if gpu_present else None
    systemd.service(
        name="nvidia-persistenced",
        service=f"{nv.PERSISTENCED_SERVICE}.service",
        running=running,
        enabled=True,
    )
    if nv.wants_fabricmanager(config, state["nvswitches"]):
        systemd.service(
            name="nvidia-fabricmanager",
            service=f"{nv.FABRICMANAGER_SERVICE}.service",
            running=running,
            enabled=True,
        )
    if not gpu_present:
        notice(
            name="NVIDIA services",
            message="no GPU here (or a container): services enabled, not started",
        )


def _reboot(
    config: NodeConfig, state: dict[str, Any], driver: Any, gpu_present: bool, in_container: bool
) -> None:
    if not gpu_present:
        if in_container:
            notice(name="Reboot", message="in a container: never rebooted")
        return
    # The module built for the running kernel differs from the loaded one (an earlier
    # run installed it without a reboot), or this run changes the driver.
    stale = bool(state["on_disk"]) and state["loaded"] != state["on_disk"]

    def needed() -> bool:
        return stale or driver.did_change()

    if not config.nvidia.reboot:
        notice(
            name="Reboot needed",
            message="the NVIDIA driver changed: reboot to load it (nvidia.reboot: false)",
            _if=needed,
        )
        return
    # one host at a time, each checked before the next: a driver that does not load
    # stops the rollout at the first host
    rolling_reboot(
        name="Reboot into the new NVIDIA driver",
        check=nv.DRIVER_LOADED_CHECK,
        reboot_timeout=config.nvidia.reboot_timeout,
        _serial=True,
        _if=needed,
    )
