"""``monitoring:``: exporters, the drift report's textfile directory, the controller's drift timer.

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

from pydantic import Field

from gpunode.schema.types import AbsPath, Calendar, Model, Port, RunPath, Span


class DriftTimer(Model):
    """The controller's scheduled drift run (deploys/controller.py): a systemd timer that
    runs ``gpunode drift INVENTORY DEPLOY --apply`` with a lock, logging to the journal."""

    inventory: RunPath = "inventories/prod.py"
    """The fleet's inventory on the controller: absolute, or relative to the repository
    copy."""
    deploy: RunPath = "deploys/gpu_node.py"
    """The deploy to check, same rules."""
    schedule: Calendar = "hourly"
    """systemd `OnCalendar=` (e.g. `hourly`, `*:0/15`)."""
    randomized_delay: Span = "5min"
    """systemd `RandomizedDelaySec=`."""
    apply: bool = True
    """Correct what drifted (`--apply`); false: only report it."""
    credentials: dict[AbsPath, str] = Field(default_factory=dict)
    """Files for the run, uploaded root-only (0600): controller path -> file on the machine
    that deploys the controller (the fleet's SSH key and known_hosts, the Vault
    secret_id file the fleet inventory names, inventory data outside the repository)."""


class Monitoring(Model):
    """Exporters and the drift report's textfile directory."""

    node_exporter: bool = True
    """Prometheus node_exporter (distro package) with the textfile collector."""
    node_exporter_port: Port = 9100
    """Its listen port (all addresses; the firewall limits who may connect); not the SSH
    port."""
    textfile_dir: AbsPath = "/var/lib/gpunode/textfile"
    """node_exporter's textfile collector reads `*.prom` here; `gpunode drift --prometheus`
    writes here."""
    dcgm_exporter: bool | None = None
    """NVIDIA dcgm-exporter (package datacenter-gpu-manager-exporter from NVIDIA's CUDA
    repository): null = on when the host has an NVIDIA GPU on the PCI bus, true = always
    (fails without the repository), false = never."""
    dcgm_exporter_port: Port = 9400
    """dcgm-exporter's listen port (its own default); not node_exporter's."""
    drift: DriftTimer = Field(default_factory=DriftTimer)
    """On controllers only."""
