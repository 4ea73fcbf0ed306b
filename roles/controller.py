"""Controller role: a host that runs ``gpunode drift --apply`` against the fleet on a schedule.

What it puts on the controller (settings in ``NodeConfig.monitoring.drift``,
gpunode/monitoring.py):

* this repository at its committed state (``git archive HEAD``; the commit is written
  beside it, for provenance) in ``/opt/gpunode/repo``;
* a venv ``/opt/gpunode/venv`` with gpunode's dependencies, installed from a wheelhouse
  built on the deploying machine and uploaded (the controller needs no package index): the
  wheels ``locks/controller.txt`` names, each checked against the lock's sha256 before it is
  uploaded, and again by ``pip install --require-hashes`` on the controller;
* the run's credentials (fleet SSH key, known_hosts, Vault secret_id, ...) as root-only
  files (0600) in the 0700 ``/etc/gpunode/controller``, through gpunode's private-file
  operation (owner and mode before content, never diffed, never printed);
* the credentials the run rotates itself (``rotated_credentials``: the AppRole secret_id
  with ``vault.rotate_secret_id``, docs/controller.md) in ``/var/lib/gpunode/controller``,
  seeded only while absent;
* ``gpunode-drift.service`` (oneshot, under ``flock`` so runs never overlap, output in
  the journal as ``gpunode-drift``) and ``gpunode-drift.timer`` on the configured schedule;
* node_exporter reading the textfile directory the run's Prometheus report goes to.

.. code:: python

    from roles.controller import controller
    controller()
"""

from __future__ import annotations

import io
from typing import Any

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.server import Arch
from pyinfra.operations import apt, files, pip, server, systemd

from gpunode import controller as ctl
from gpunode import locks
from gpunode.facts.files import PrivateFileState
from gpunode.inventory import node_and_distro
from gpunode.monitoring import read_credential
from gpunode.operations.files import MaskedBytes, private_file
from gpunode.operations.packages import apt_update
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
        apt_update(name="Refresh apt package lists (controller)")
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
        user="root",
        group="root",
    )
    server.shell(
        name="Unpack the gpunode repository",
        commands=[
            f"rm -rf {ctl.REPO}.new && mkdir {ctl.REPO}.new && tar -xzf {ctl.HOME}/repo.tar.gz "
            f"-C {ctl.REPO}.new && rm -rf {ctl.REPO} && mv {ctl.REPO}.new {ctl.REPO}"
        ],
        _if=repo_tar.did_change,
    )

    try:  # every wheel checked against locks/controller.txt here, and by pip there
        lock = locks.read(locks.CONTROLLER_LOCK)
        wheelhouse = ctl.wheelhouse(python, machine)
    except locks.LockError as exc:
        fail(name="Check the wheelhouse against its lock", message=f"host {host.name}: {exc}")
        return
    wheels = files.put(
        name="Wheelhouse (gpunode's dependencies)",
        src=io.BytesIO(wheelhouse),
        dest=f"{ctl.HOME}/wheelhouse.tar",
        mode="644",
        user="root",
        group="root",
    )
    lock_file = files.put(
        name="Lock file of the wheelhouse",
        src=io.BytesIO(lock.text.encode()),
        dest=ctl.REQUIREMENTS,
        user="root",
        group="root",
        mode="644",
    )
    venv = pip.virtualenv(name="gpunode venv", path=ctl.VENV, venv=True, python="python3")
    server.shell(
        name="Install gpunode's dependencies from the wheelhouse (hash-checked)",
        commands=[
            f"rm -rf {ctl.WHEELHOUSE} && mkdir {ctl.WHEELHOUSE} && "
            f"tar -xf {ctl.HOME}/wheelhouse.tar -C {ctl.WHEELHOUSE} && "
            # --force-reinstall: what the venv holds is what was just hash-checked
            + locks.install_command(
                f"{ctl.VENV}/bin/pip", ctl.REQUIREMENTS, find_links=ctl.WHEELHOUSE, reinstall=True
            )
        ],
        _if=lambda: wheels.did_change() or venv.did_change() or lock_file.did_change(),
    )

    # read now: a missing, unreadable or empty source stops the run before anything runs
    for dest, local in sorted(drift.credentials.items()):
        private_file(
            name="Drift run credential file",
            path=dest,
            content=MaskedBytes(dest, read_credential(host.name, dest, local)),
            user="root",
            group="root",
            mode="600",
        )

    # The credentials the run replaces itself (vault.rotate_secret_id, docs/controller.md):
    # seeded only while absent, never put back over the one the last run wrote. The seed
    # is read only then: deleting it after the first run (which destroyed it) is fine.
    for dest, local in sorted(drift.rotated_credentials.items()):
        if host.get_fact(PrivateFileState, path=dest) is None:
            private_file(
                name="Seed a credential the drift run rotates",
                path=dest,
                content=MaskedBytes(dest, read_credential(host.name, dest, local)),
                user="root",
                group="root",
                mode="600",
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
        user="root",
        group="root",
    )
    timer = files.template(
        name="gpunode-drift timer",
        src=template("controller/gpunode-drift.timer.j2"),
        dest=f"/etc/systemd/system/{ctl.TIMER}",
        mode="644",
        schedule=drift.schedule,
        randomized_delay=drift.randomized_delay,
        user="root",
        group="root",
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
