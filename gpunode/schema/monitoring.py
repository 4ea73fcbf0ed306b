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

import posixpath

from pydantic import Field, field_validator

from gpunode.schema.types import AbsPath, Calendar, ControllerPath, Model, Port, RunPath, Span

CREDENTIALS_DIR = "/etc/gpunode/controller"
"""The root-only (0700) directory on the controller that holds the drift run's credentials."""

ROTATED_CREDENTIALS_DIR = "/var/lib/gpunode/controller"
"""The drift run's state directory (0700, writable by the run): the credentials it rotates."""


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
    credentials: dict[AbsPath, ControllerPath] = Field(default_factory=dict)
    """Files for the run: controller path (a file directly in `/etc/gpunode/controller`, the
    root-only 0700 directory) -> file on the machine that deploys the controller (the
    fleet's SSH key and known_hosts, the Vault secret_id file the fleet inventory names,
    inventory data outside the repository). Each is read at deploy time (missing, unreadable
    or empty: the run stops before anything is written) and uploaded root 0600 the way
    secrets are: owner and mode before content, never diffed, never printed."""
    rotated_credentials: dict[AbsPath, ControllerPath] = Field(default_factory=dict)
    """Files the run replaces itself, such as the AppRole secret_id with
    `vault.rotate_secret_id` (docs/controller.md): controller path (a file directly in
    `/var/lib/gpunode/controller`, the run's own 0700 state directory, which it may write)
    -> seed file on the deploying machine, uploaded root-only (0600) like `credentials` but
    only while the controller has no such file, never over the one the run wrote."""

    @field_validator("credentials")
    @classmethod
    def _in_credentials_dir(cls, credentials: dict[str, str]) -> dict[str, str]:
        return _directly_in(CREDENTIALS_DIR, "the controller's root-only directory", credentials)

    @field_validator("rotated_credentials")
    @classmethod
    def _in_state_dir(cls, rotated: dict[str, str]) -> dict[str, str]:
        return _directly_in(ROTATED_CREDENTIALS_DIR, "the drift run's own state directory", rotated)


def _directly_in(directory: str, what: str, files: dict[str, str]) -> dict[str, str]:
    """``files`` if every key is a file directly in ``directory``; else the error."""
    for dest in files:
        if posixpath.dirname(dest) != directory:
            raise ValueError(
                f"{dest}: not a file in {directory} (allowed: {directory}/NAME, {what})"
            )
    return files


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
