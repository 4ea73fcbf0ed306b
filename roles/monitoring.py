"""Monitoring role: node_exporter with the drift report's textfile directory, and
NVIDIA's dcgm-exporter on GPU nodes.

Everything it reads is in ``NodeConfig.monitoring`` (gpunode/monitoring.py);
the firewall role opens ``metrics_ports(config)`` to ``network.monitoring_cidrs``.
node_exporter comes from the distro (Debian/Ubuntu ``prometheus-node-exporter``);
EL9 has none in its base repositories (EPEL has ``golang-github-prometheus-node-exporter``):
the role says so and skips it there. dcgm-exporter comes from NVIDIA's CUDA
repository, which the GPU stack role sets up.

.. code:: python

    from roles.monitoring import monitoring
    monitoring()
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.deb import DebPackages
from pyinfra.operations import apt, dnf, files, systemd

from gpunode import monitoring as exporters
from gpunode.facts.nvidia import NvidiaHost
from gpunode.inventory import node_and_distro
from gpunode.operations.packages import apt_update
from gpunode.operations.server import notice
from gpunode.paths import template
from gpunode.provenance import record
from gpunode.schema import distros
from gpunode.schema.node import NodeConfig


@deploy("gpunode monitoring")
def monitoring() -> None:
    config, spec = node_and_distro(host)
    textfile_and_node_exporter(config, spec)
    _dcgm_exporter(config, spec)


def textfile_and_node_exporter(config: NodeConfig, spec: distros.DistroSpec) -> None:
    """The drift report's textfile directory and node_exporter reading it (nodes and
    the controller)."""
    files.directory(
        name="Drift report directory (textfile collector)",
        path=config.monitoring.textfile_dir,
        mode="755",
        user="root",
        group="root",
    )
    if config.monitoring.node_exporter:
        node_exporter(config, spec)


def node_exporter(config: NodeConfig, spec: distros.DistroSpec) -> None:
    """node_exporter from the distro, reading the textfile directory (also used by
    deploys/controller.py)."""
    exporter = exporters.NODE_EXPORTER.get(spec.family)
    if exporter is None:
        notice(
            name="node_exporter",
            message="no node_exporter package in this distro's repositories: "
            "install it from EPEL or upstream (see docs/verification.md)",
        )
        return
    if exporter.package not in host.get_fact(DebPackages):
        apt_update(name="Refresh apt package lists (node_exporter)")
    apt.packages(name="node_exporter package", packages=[exporter.package], no_recommends=True)
    conf = files.template(
        name="node_exporter flags",
        src=template("monitoring/prometheus-node-exporter.default.j2"),
        dest=exporter.defaults_file,
        mode="644",
        monitoring=config.monitoring,
        args_variable=exporter.args_variable,
        user="root",
        group="root",
    )
    systemd.service(
        name="node_exporter running", service=exporter.service, running=True, enabled=True
    )
    systemd.service(
        name="Restart node_exporter",  # applies new flags
        service=exporter.service,
        restarted=True,
        _if=conf.did_change,
    )


def _dcgm_exporter(config: NodeConfig, spec: distros.DistroSpec) -> None:
    wanted = config.monitoring.dcgm_exporter
    if wanted is None:
        wanted = bool(host.get_fact(NvidiaHost)["gpus"])
        if not wanted:
            notice(name="dcgm-exporter", message="no NVIDIA GPU found: dcgm-exporter skipped")
            return
    if not wanted:
        return
    if spec.family == "apt":
        apt.packages(
            name="dcgm-exporter package",
            packages=[exporters.DCGM_EXPORTER_PACKAGE],
            no_recommends=True,
        )
    else:
        dnf.packages(name="dcgm-exporter package", packages=[exporters.DCGM_EXPORTER_PACKAGE])
    dropin = files.template(
        name="dcgm-exporter listen address",
        src=template("monitoring/dcgm-exporter.conf.j2"),
        dest=exporters.DCGM_EXPORTER_DROPIN,
        mode="644",
        monitoring=config.monitoring,
        user="root",
        group="root",
    )
    systemd.daemon_reload(name="Reload systemd units (dcgm-exporter)", _if=dropin.did_change)
    systemd.service(
        name="dcgm-exporter running",
        service=exporters.DCGM_EXPORTER_SERVICE,
        running=True,
        enabled=True,
    )
    systemd.service(
        name="Restart dcgm-exporter",
        service=exporters.DCGM_EXPORTER_SERVICE,
        restarted=True,
        _if=dropin.did_change,
    )
    record("monitoring", {"dcgm_exporter": exporters.DCGM_EXPORTER_PACKAGE})
