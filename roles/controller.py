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

import functools
import gzip
import io
import json
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path
from typing import Any

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.server import Arch
from pyinfra.operations import apt, files, pip, server, systemd

from gpunode import distros
from gpunode.inventory import node_config
from gpunode.operations import fail
from gpunode.paths import REPO_ROOT, TEMPLATES
from gpunode.provenance import SOURCE_STAMP
from roles.monitoring import textfile_and_node_exporter

T = TEMPLATES / "controller"
HOME = "/opt/gpunode"
REPO = f"{HOME}/repo"
VENV = f"{HOME}/venv"
WHEELHOUSE = f"{HOME}/wheelhouse"
STATE = "/var/lib/gpunode/controller"
LOCK = "/run/lock/gpunode-drift.lock"
LOCK_BUSY = 75  # EX_TEMPFAIL: another run holds the lock
SERVICE = "gpunode-drift.service"
TIMER = "gpunode-drift.timer"
SOURCE_FILE = SOURCE_STAMP  # commit of the archive, read by gpunode.provenance

# Debian/Ubuntu packages a controller needs (python3-venv: ensurepip for the venv).
APT_PACKAGES = ("python3", "python3-venv", "util-linux", "openssh-client")


# The distro python3 a controller runs gpunode with (gpunode needs 3.11 or newer).
CONTROLLER_PYTHON = {"debian12": "3.11", "ubuntu2404": "3.12"}


def requirements() -> list[str]:
    """gpunode's runtime dependencies, from pyproject.toml."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    return list(project["project"]["dependencies"])


@functools.cache
def wheelhouse(python: str, machine: str) -> bytes:
    """A reproducible .tar of the wheels for gpunode's dependencies on that Python and
    machine (downloaded with pip on this machine, once per process; cached on disk)."""
    cache = Path.home() / ".cache" / "gpunode" / f"wheelhouse-py{python}-{machine}"
    cache.mkdir(parents=True, exist_ok=True)
    stamp = cache / "requirements.json"
    wanted = json.dumps(requirements())
    if not stamp.exists() or stamp.read_text() != wanted:
        for old in cache.glob("*.whl"):
            old.unlink()
        platforms = [f"manylinux_2_{n}_{machine}" for n in (36, 34, 31, 28, 24, 17)]
        platforms.append(f"manylinux2014_{machine}")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--dest",
                str(cache),
                "--only-binary=:all:",
                "--python-version",
                python,
                "--implementation",
                "cp",
                *(arg for p in platforms for arg in ("--platform", p)),
                *requirements(),
            ],
            check=True,
            stdin=subprocess.DEVNULL,
        )
        stamp.write_text(wanted)
    return _tar({p.name: p.read_bytes() for p in sorted(cache.glob("*.whl"))}, compress=False)


@functools.cache
def repository() -> tuple[bytes, str]:
    """(``git archive HEAD`` of this repository plus the source stamp, commit)."""
    commit = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", commit],
        capture_output=True,
        check=True,
    ).stdout
    stamp = json.dumps({"commit": commit, "dirty": False}).encode() + b"\n"
    with tarfile.open(fileobj=io.BytesIO(archive)) as src:
        members = {
            m.name: src.extractfile(m).read()  # type: ignore[union-attr]
            for m in src.getmembers()
            if m.isfile()
        }
    members[SOURCE_FILE] = stamp
    return _tar(members, compress=True), commit


def _tar(members: dict[str, bytes], compress: bool) -> bytes:
    """A byte-for-byte reproducible tar (fixed owners and times): uploaded only on change."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(members[name]), 0, 0o644
            tar.addfile(info, io.BytesIO(members[name]))
    data = raw.getvalue()
    return gzip.compress(data, mtime=0) if compress else data


def _path(value: str) -> str:
    return value if value.startswith("/") else f"{REPO}/{value}"


@deploy("gpunode controller")
def controller() -> None:
    config = node_config(host)
    assert config.distro is not None
    spec = distros.get(config.distro)
    drift = config.monitoring.drift
    python = CONTROLLER_PYTHON.get(config.distro)
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
            f"--find-links {WHEELHOUSE} --upgrade {' '.join(_quote(r) for r in requirements())}"
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
        inventory=_path(drift.inventory),
        deploy=_path(drift.deploy),
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


def _quote(requirement: str) -> str:
    return "'" + requirement.replace("'", "") + "'"
