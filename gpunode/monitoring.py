"""Monitoring: the metrics ports a node opens, how each distro ships the exporters, and the
checks of ``monitoring:`` against the rest of a node's config (roles/monitoring.py applies
them; the section is gpunode/schema/monitoring.py).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from pyinfra.api.exceptions import PyinfraError

from gpunode import gateway
from gpunode.schema.node import Connection, NodeConfig
from gpunode.schema.runtimes import PROFILES


def check_host(where: str, config: NodeConfig, connection: Connection) -> list[str]:
    """Checks that need the merged config (and the host's connection); [] when fine."""
    mon = config.monitoring
    problems = []
    if (
        mon.dcgm_exporter is not False
        and mon.node_exporter
        and (mon.node_exporter_port == mon.dcgm_exporter_port)
    ):
        problems.append(
            f"{where}: monitoring.dcgm_exporter_port: {mon.dcgm_exporter_port} is already "
            "monitoring.node_exporter_port (allowed: two different ports)"
        )
    # A port that is also SSH's, Nomad's or a service's: gpunode/config.py _check_listeners.
    return problems


CREDENTIAL_MAX_BYTES = 1 << 20  # a key, a token, an inventory file: far less


class CredentialError(PyinfraError):
    """A drift-run credential's source file cannot be used. Raised while the deploy file
    runs, it stops the whole run with its message before any operation on any host."""


def read_credential(host_name: str, dest: str, local: str) -> bytes:
    """The content of ``monitoring.drift.credentials[dest]`` (``local``, on the machine
    that deploys the controller): a readable, non-empty regular file of at most 1 MiB,
    or :class:`CredentialError` naming the host, the key and the file. Read at deploy
    time, not at config load: the controller's own drift runs load inventories that may
    name these files, and they exist only on the deploying machine."""
    where = f"host {host_name}: monitoring.drift.credentials: {dest}: {local}"
    allowed = (
        "(allowed: a readable, non-empty file of at most 1 MiB on the machine that deploys "
        "the controller)"
    )
    try:
        fd = os.open(Path(local).expanduser(), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise CredentialError(f"{where}: {_reason(exc)} {allowed}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CredentialError(f"{where}: not a regular file {allowed}")
        if info.st_size > CREDENTIAL_MAX_BYTES:
            raise CredentialError(f"{where}: {info.st_size} bytes {allowed}")
        data = os.read(fd, CREDENTIAL_MAX_BYTES + 1)
    except OSError as exc:
        raise CredentialError(f"{where}: {_reason(exc)} {allowed}") from None
    finally:
        os.close(fd)
    if not data:
        raise CredentialError(f"{where}: the file is empty {allowed}")
    if len(data) > CREDENTIAL_MAX_BYTES:
        raise CredentialError(f"{where}: larger than 1 MiB {allowed}")
    return data


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()


def metrics_ports(config: NodeConfig) -> list[tuple[str, int]]:
    """(protocol, port) of every metrics endpoint on the node; the firewall opens them
    to network.monitoring_cidrs."""
    mon = config.monitoring
    ports = []
    if mon.node_exporter:
        ports.append(("tcp", mon.node_exporter_port))
    if mon.dcgm_exporter is not False:
        # open even when auto-detection finds no GPU: the port is closed then anyway
        ports.append(("tcp", mon.dcgm_exporter_port))
    for svc in config.inference.services.values():
        # a runtime with a metrics port of its own (Triton's 8002); the others serve
        # /metrics on their API port, which network.app_cidrs reach
        if svc.enabled and PROFILES[svc.runtime].metrics_port == "own":
            ports.append(("tcp", svc.effective_metrics_port()))
    ports += gateway.metrics_ports(config)
    return ports


@dataclass(frozen=True)
class NodeExporterSpec:
    """How a distro family ships node_exporter."""

    package: str
    service: str
    defaults_file: str  # EnvironmentFile of the packaged unit
    args_variable: str  # the variable in it that holds the command-line flags


# Debian/Ubuntu: the distro's prometheus-node-exporter (its unit runs
# `prometheus-node-exporter $ARGS` with EnvironmentFile=/etc/default/prometheus-node-exporter).
# EL9 has no node_exporter in its base repositories (EPEL ships
# golang-github-prometheus-node-exporter); roles/monitoring.py says so and skips.
NODE_EXPORTER: dict[str, NodeExporterSpec] = {
    "apt": NodeExporterSpec(
        package="prometheus-node-exporter",
        service="prometheus-node-exporter.service",
        defaults_file="/etc/default/prometheus-node-exporter",
        args_variable="ARGS",
    ),
}

# NVIDIA's package (same name in its apt and dnf repositories) and the unit it ships;
# DCGM_EXPORTER_LISTEN is the environment form of its -a/--address flag.
DCGM_EXPORTER_PACKAGE = "datacenter-gpu-manager-exporter"
DCGM_EXPORTER_SERVICE = "nvidia-dcgm-exporter.service"
DCGM_EXPORTER_DROPIN = "/etc/systemd/system/nvidia-dcgm-exporter.service.d/50-gpunode.conf"
