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

from gpunode import controller as ctl
from gpunode.inventory import node_and_distro
from gpunode.operations.server import fail
from gpunode.paths import template
from roles.monitoring import textfile_and_node_exporter


@deploy("gpunode controller")
def controller() -> None:
    config, spec = node_and_distro(host)
    drift = config.monitoring.drift
    python = ctl.CONTROLLER_PYTHON.get(spec.key)
    if python is None:
        fail(
            name="Check the controller's distro",
            message=f"host {host.name}: distro: {config.distro} has no python3 >= 3.11 for "
            f"gpunode (allowed for a controller: {', '.join(ctl.CONTROLLER_PYTHON)})",
        )
        return
    if any(p not in host.get_fact(DebPackages) for p in ctl.APT_PACKAGES):
        apt.update(name="Refresh apt package lists (controller)")
    apt.packages(name="Controller packages", packages=list(ctl.APT_PACKAGES), no_recommends=True)
    machine = host.get_fact(Arch)

    for path, mode in ((ctl.HOME, "755"), (ctl.STATE, "700"), ("/etc/gpunode/controller", "700")):
        files.directory(
            name="Controller directory", path=path, mode=mode, user="root", group="root"
        )

    archive, _ = ctl.repository()
    repo_tar = files.put(
        name="gpunode repository (archive)",
        src=io.BytesIO(archive),
        dest=f"{ctl.HOME}/repo.tar.gz",
        mode="644",
    )
    server.shell(
        name="Unpack the gpunode repository",
        commands=[
            f"rm -rf {ctl.REPO}.new && mkdir {ctl.REPO}.new && tar -xzf {ctl.HOME}/repo.tar.gz "
            f"-C {ctl.REPO}.new && rm -rf {ctl.REPO} && mv {ctl.REPO}.new {ctl.REPO}"
        ],
        _if=repo_tar.did_change,
    )

    wheels = files.put(
        name="Wheelhouse (gpunode's dependencies)",
        src=io.BytesIO(ctl.wheelhouse(python, machine)),
        dest=f"{ctl.HOME}/wheelhouse.tar",
        mode="644",
    )
    venv = pip.virtualenv(name="gpunode venv", path=ctl.VENV, venv=True, python="python3")
    server.shell(
        name="Install gpunode's dependencies from the wheelhouse",
        commands=[
            f"rm -rf {ctl.WHEELHOUSE} && mkdir {ctl.WHEELHOUSE} && "
            f"tar -xf {ctl.HOME}/wheelhouse.tar -C {ctl.WHEELHOUSE} && "
            f"{ctl.VENV}/bin/pip install --quiet --no-index "
            f"--find-links {ctl.WHEELHOUSE} --upgrade "
            + " ".join(ctl.quote_requirement(r) for r in ctl.requirements())
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
        repo=ctl.REPO,
        venv=ctl.VENV,
        inventory=ctl.repo_path(drift.inventory),
        deploy=ctl.repo_path(drift.deploy),
        apply=drift.apply,
        state_dir=ctl.STATE,
        writable=sorted({ctl.STATE, config.monitoring.textfile_dir}),
        textfile=f"{config.monitoring.textfile_dir}/gpunode_drift.prom",
        lock=ctl.LOCK,
        lock_busy_status=ctl.LOCK_BUSY,
    )
    service = files.template(
        name="gpunode-drift service",
        src=template("controller/gpunode-drift.service.j2"),
        dest=f"/etc/systemd/system/{ctl.SERVICE}",
        mode="644",
        **unit_args,
    )
    timer = files.template(
        name="gpunode-drift timer",
        src=template("controller/gpunode-drift.timer.j2"),
        dest=f"/etc/systemd/system/{ctl.TIMER}",
        mode="644",
        schedule=drift.schedule,
        randomized_delay=drift.randomized_delay,
    )
    systemd.daemon_reload(
        name="Reload systemd units (gpunode-drift)",
        _if=lambda: service.did_change() or timer.did_change(),
    )
    systemd.service(
        name="gpunode-drift timer enabled", service=ctl.TIMER, running=True, enabled=True
    )
    systemd.service(
        name="Restart gpunode-drift timer",  # applies a new schedule
        service=ctl.TIMER,
        restarted=True,
        _if=timer.did_change,
    )
