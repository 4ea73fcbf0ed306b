"""Host checks: what holds on any provisioned gpunode node.

Run through `gpunode verify INVENTORY`, which sets GPUNODE_INVENTORY and
GPUNODE_HOST and points testinfra at the host.
"""

from __future__ import annotations

import os

import pytest

from gpunode.inventory import load_inventory_file
from gpunode.schema import distros
from gpunode.schema.node import Host


@pytest.fixture(scope="session")
def node() -> Host:
    path, name = os.environ.get("GPUNODE_INVENTORY"), os.environ.get("GPUNODE_HOST")
    if not path or not name:
        pytest.fail("run the host checks through `gpunode verify INVENTORY`")
    return load_inventory_file(path).hosts[name]


@pytest.fixture(scope="session")
def spec(node: Host) -> distros.DistroSpec:
    assert node.config.distro
    return distros.get(node.config.distro)


@pytest.fixture(scope="module")
def in_container(host) -> bool:
    out = host.run("systemd-detect-virt --container")
    return out.rc == 0 and out.stdout.strip() not in ("", "none")


@pytest.fixture(scope="module")
def as_login(host):
    """Run a command as the inventory's login user itself: ``gpunode verify`` runs every check
    through sudo (testinfra's --sudo) when that user is not root, and a few checks are about
    the login, not the system. Returns its stdout, stripped; fails on a non-zero exit."""

    def run(command: str) -> str:
        backend = host.backend
        before = backend.sudo
        backend.sudo = False
        try:
            return host.check_output(command)
        finally:
            backend.sudo = before

    return run


@pytest.fixture(scope="module")
def as_root(host, node: Host):
    """Run a command as root (gpunode may connect as an admin user with sudo)."""

    def run(command: str):
        if node.connection.user == "root":
            return host.run(command)
        with host.sudo():
            return host.run(command)

    return run
