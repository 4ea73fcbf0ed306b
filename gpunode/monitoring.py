"""Monitoring and drift: exporters, the drift report's textfile directory, GPU detection.

roles/monitoring.py installs node_exporter (with its textfile collector reading
:attr:`Monitoring.textfile_dir`, where ``gpunode drift --prometheus`` writes) and,
on GPU nodes, NVIDIA's dcgm-exporter. The firewall opens :func:`metrics_ports`
to ``network.monitoring_cidrs`` only.

.. code:: yaml

    monitoring:
      node_exporter_port: 9100
      dcgm_exporter: null        # null: on when the host has an NVIDIA GPU
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from pydantic import Field, StringConstraints
from pyinfra.api import FactBase

from gpunode.schema import Model

if TYPE_CHECKING:
    from gpunode.config import Connection, NodeConfig

Port = Annotated[int, Field(ge=1, le=65535)]
AbsPath = Annotated[str, StringConstraints(pattern=r"^/[A-Za-z0-9._/-]*[A-Za-z0-9._-]$")]
RunPath = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._/-]*[A-Za-z0-9._-]$")]
Calendar = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9*:/,.~ -]{1,64}$")]
Span = Annotated[str, StringConstraints(pattern=r"^[0-9]+(us|ms|s|min|h|d)?$")]


class DriftTimer(Model):
    """The controller's scheduled drift run (deploys/controller.py): a systemd timer that
    runs ``gpunode drift INVENTORY DEPLOY --apply`` with a lock, logging to the journal."""

    # the fleet's inventory on the controller: absolute, or relative to the repository copy
    inventory: RunPath = "inventories/prod.py"
    deploy: RunPath = "deploys/gpu_node.py"  # the deploy to check, same rules
    schedule: Calendar = "hourly"  # systemd OnCalendar= (e.g. "hourly", "*:0/15")
    randomized_delay: Span = "5min"  # systemd RandomizedDelaySec=
    apply: bool = True  # correct what drifted (--apply); False: only report it
    # files for the run, uploaded root-only (0600): controller path -> file on the machine
    # that deploys the controller (the fleet's SSH key and known_hosts, the Vault
    # secret_id file the fleet inventory names, inventory data outside the repository)
    credentials: dict[AbsPath, str] = Field(default_factory=dict)


class Monitoring(Model):
    """Exporters and the drift report's textfile directory."""

    node_exporter: bool = (
        True  # Prometheus node_exporter (distro package) with the textfile collector
    )
    node_exporter_port: Port = (
        9100  # its listen port (all addresses; the firewall limits who may connect)
    )
    # node_exporter's textfile collector reads *.prom here; `gpunode drift --prometheus` writes here
    textfile_dir: AbsPath = "/var/lib/gpunode/textfile"
    # NVIDIA dcgm-exporter (package datacenter-gpu-manager-exporter from NVIDIA's CUDA repository):
    # None = on when the host has an NVIDIA GPU (lspci), True = always (fails without the
    # repository), False = never
    dcgm_exporter: bool | None = None
    dcgm_exporter_port: Port = 9400  # dcgm-exporter's listen port (its own default)
    drift: DriftTimer = Field(default_factory=DriftTimer)  # on controllers only


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


class NvidiaGpuCount(FactBase):
    """
    How many NVIDIA GPUs (PCI vendor 10de, display controller class 03xx) the host has,
    from ``lspci -Dnn`` (pciutils, a base package); 0 without one or without lspci.
    NVSwitches (class 0680) are not GPUs.

    .. code:: python

        8
    """

    def command(self) -> str:
        return "lspci -Dnn 2>/dev/null | grep -F '[10de:' || true"

    @staticmethod
    def default() -> int:  # no output at all: no NVIDIA device
        return 0

    def process(self, output: list[str]) -> int:
        return sum(1 for line in output if _LSPCI_GPU.match(line))


# "0000:1b:00.0 3D controller [0302]: NVIDIA Corporation GH100 [H100 SXM5 80GB] [10de:2330]"
_LSPCI_GPU = re.compile(r"^\S+ .*\[03[0-9a-f]{2}\]: .*\[10de:[0-9a-f]{4}\]")
