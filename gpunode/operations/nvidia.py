"""pyinfra operations of the GPU stack, for what pyinfra's own do not cover: package
holds (apt-mark hold / dnf versionlock) and dnf module streams (the reboot into a new
driver is :func:`gpunode.operations.server.rolling_reboot`, checked with
:data:`gpunode.nvidia.DRIVER_LOADED_CHECK`)."""

from __future__ import annotations

from collections.abc import Sequence

from pyinfra import host
from pyinfra.api import operation

from gpunode.facts.nvidia import DnfModule, UnheldPackages, installed_matching


@operation(is_idempotent=True)
def hold_packages(family: str, patterns: Sequence[str], after_install: bool = False):
    """
    Hold every installed package matching ``patterns`` (shell globs) so upgrades cannot
    move the driver's user space away from its kernel module: ``apt-mark hold`` on apt,
    ``dnf versionlock add`` on dnf. Which packages match is decided on the host when the
    command runs, so dependencies installed earlier in the same deploy are held too.

    + family: ``apt`` or ``dnf``
    + patterns: package name globs, e.g. ``("*nvidia*", "cuda-*")``
    + after_install: hold even when nothing was unheld at plan time (use with
      ``_if=install.did_change``: the packages were installed by this deploy)

    .. code:: python

        hold_packages(name="Hold NVIDIA packages", family="apt", patterns=("*nvidia*",))
    """
    patterns = tuple(patterns)
    if not after_install and not host.get_fact(UnheldPackages, family=family, patterns=patterns):
        return
    hold = "apt-mark hold" if family == "apt" else "dnf versionlock add"
    yield f"{installed_matching(family, patterns)} | xargs -r {hold}"


@operation(is_idempotent=True)
def dnf_module_stream(module: str, stream: str):
    """
    Install a dnf module's stream with its default profile (switching from another stream).

    .. code:: python

        dnf_module_stream(name="NVIDIA driver stream", module="nvidia-driver",
                          stream="580-open")
    """
    current = host.get_fact(DnfModule, module=module)
    if current.get("state") == "enabled" and current.get("stream") == stream:
        if current.get("profiles"):
            return
    if current.get("state") == "enabled" and current.get("stream") not in (None, "", stream):
        yield f"dnf -y module switch-to {module}:{stream}"
        return
    yield f"dnf -y module install {module}:{stream}"
