"""Monitoring: the metrics ports a node opens, how each distro ships the exporters, and the
checks of ``monitoring:`` against the rest of a node's config (roles/monitoring.py applies
them; the section is gpunode/schema/monitoring.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from gpunode.schema.node import Connection, NodeConfig


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
    if mon.node_exporter and mon.node_exporter_port == connection.port:
        problems.append(
            f"{where}: monitoring.node_exporter_port: {mon.node_exporter_port} is the SSH port "
            "(allowed: any other port)"
        )
    return problems


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
