"""Controller role: a host that runs ``gpunode drift --apply`` against the fleet on a schedule.

What it puts on the controller (settings in ``NodeConfig.monitoring.drift``,
gpunode/monitoring.py):

* this repository at its committed state (``git archive HEAD``; the commit is written
  beside it, for provenance) in ``/opt/gpunode/repo``;
* a venv ``/opt/gpunode/venv`` with gpunode's dependencies, installed from a wheelhouse
  built on the deploying machine and uploaded (the controller needs no package index);
* the run's credentials (fleet SSH key, known_hosts, Vault secret_id, ...) as root-only
  files (0600);
* ``gpunode-drift.service`` (oneshot, under ``flock`` so runs never overlap, output in
  the journal as ``gpunode-drift``) and ``gpunode-drift.timer`` on the configured schedule;
* node_exporter reading the textfile directory the run's Prometheus report goes to.

.. code:: python

    from roles.controller import controller
    controller()
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.server import Arch
from pyinfra.operations import apt, files, pip, server, systemd

from gpunode.controller import (
    APT_PACKAGES,
    CONTROLLER_PYTHON,
    HOME,
    LOCK,
    LOCK_BUSY,
    REPO,
    SERVICE,
    STATE,
    TIMER,
    VENV,
    WHEELHOUSE,
    quote_requirement,
    repo_path,
    repository,
    requirements,
    wheelhouse,
)
from gpunode.inventory import node_and_distro
from gpunode.operations.server import fail
from gpunode.paths import TEMPLATES
from roles.monitoring import textfile_and_node_exporter

T = TEMPLATES / "controller"


@deploy("gpunode controller")
def controller() -> None:
    config, spec = node_and_distro(host)
    drift = config.monitoring.drift
    python = CONTROLLER_PYTHON.get(spec.key)
    if python is None:
        fail(
            name="Check the controller's distro",
            message=f"host {host.name}: distro: {config.distro} has no python3 >= 3.11 for "
            f"gpunode (allowed for a controller: {', '.join(CONTROLLER_PYTHON)})",
        )
        return
    if any(p not in host.get_fact(DebPackages) for p in APT_PACKAGES):
        apt.update(name="Refresh apt package lists (controller)")
    apt.packages(name="Controller packages", packages=list(APT_PACKAGES), no_recommends=True)
    machine = host.get_fact(Arch)

    for path, mode in ((HOME, "755"), (STATE, "700"), ("/etc/gpunode/controller", "700")):
        files.directory(
            name="Controller directory", path=path, mode=mode, user="root", group="root"
        )

    archive, _ = repository()
    repo_tar = files.put(
        name="gpunode repository (archive)",
        src=io.BytesIO(archive),
        dest=f"{HOME}/repo.tar.gz",
        mode="644",
    )
    server.shell(
        name="Unpack the gpunode repository",
        commands=[
            f"rm -rf {REPO}.new && mkdir {REPO}.new && tar -xzf {HOME}/repo.tar.gz "
            f"-C {REPO}.new && rm -rf {REPO} && mv {REPO}.new {REPO}"
        ],
        _if=repo_tar.did_change,
    )

    wheels = files.put(
        name="Wheelhouse (gpunode's dependencies)",
        src=io.BytesIO(wheelhouse(python, machine)),
        dest=f"{HOME}/wheelhouse.tar",
        mode="644",
    )
    venv = pip.virtualenv(name="gpunode venv", path=VENV, venv=True, python="python3")
    server.shell(
        name="Install gpunode's dependencies from the wheelhouse",
        commands=[
            f"rm -rf {WHEELHOUSE} && mkdir {WHEELHOUSE} && tar -xf {HOME}/wheelhouse.tar "
            f"-C {WHEELHOUSE} && {VENV}/bin/pip install --quiet --no-index "
            f"--find-links {WHEELHOUSE} --upgrade "
            + " ".join(quote_requirement(r) for r in requirements())
        ],
        _if=lambda: wheels.did_change() or venv.did_change(),
    )

    for dest, local in sorted(drift.credentials.items()):
        files.put(
            name="Drift run credential file",
            src=str(Path(local).expanduser()),
            dest=dest,
            mode="600",
            user="root",
            group="root",
        )

    textfile_and_node_exporter(config, spec)

    unit_args: dict[str, Any] = dict(
        repo=REPO,
        venv=VENV,
        inventory=repo_path(drift.inventory),
        deploy=repo_path(drift.deploy),
        apply=drift.apply,
        state_dir=STATE,
        writable=sorted({STATE, config.monitoring.textfile_dir}),
        textfile=f"{config.monitoring.textfile_dir}/gpunode_drift.prom",
        lock=LOCK,
        lock_busy_status=LOCK_BUSY,
    )
    service = files.template(
        name="gpunode-drift service",
        src=str(T / "gpunode-drift.service.j2"),
        dest=f"/etc/systemd/system/{SERVICE}",
        mode="644",
        **unit_args,
    )
    timer = files.template(
        name="gpunode-drift timer",
        src=str(T / "gpunode-drift.timer.j2"),
        dest=f"/etc/systemd/system/{TIMER}",
        mode="644",
        schedule=drift.schedule,
        randomized_delay=drift.randomized_delay,
    )
    systemd.daemon_reload(
        name="Reload systemd units (gpunode-drift)",
        _if=lambda: service.did_change() or timer.did_change(),
    )
    systemd.service(name="gpunode-drift timer enabled", service=TIMER, running=True, enabled=True)
    systemd.service(
        name="Restart gpunode-drift timer",  # applies a new schedule
        service=TIMER,
        restarted=True,
        _if=timer.did_change,
    )
