"""Inference services as hardened systemd units.

For each service in ``NodeConfig.inference.services`` (gpunode/inference.py, where every
default is documented): the runtime is installed (a venv filled by ``pip install
--require-hashes`` from its lock file, a distro package, or a tarball artifact checked by
sha256), the model is fetched into the content-addressed store
and verified before the ``current`` link is switched to it, a dedicated system user is
created, and the unit (templates/inference/service.j2) is written with a sandbox:
ProtectSystem=strict, no capabilities, only its cache writable, only its GPUs' device
nodes. daemon-reload runs only when a unit changed; a unit restarts only when its unit
file, runtime, model or API-key secret changed, and the deploy then waits for its health
endpoint. A node with no services gets no operation at all.

.. code:: python

    from roles.inference_systemd import inference_systemd
    inference_systemd()
"""

from __future__ import annotations

import hashlib
import io
import json
import shlex

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.pip import PipPackages
from pyinfra.facts.systemd import SystemdStatus
from pyinfra.operations import apt, dnf, files, pip, server, systemd
from pyinfra.operations.util import any_changed

from gpunode import inference as units
from gpunode.facts.artifacts import Links, StoreDigests
from gpunode.facts.nvidia import NvidiaGpuMinors
from gpunode.inventory import node_and_distro
from gpunode.locks import install_command
from gpunode.operations.artifacts import fetch, prune, switch
from gpunode.operations.server import fail
from gpunode.operations.systemd import restart_unit, start_unit, wait_healthy
from gpunode.provenance import record, recorded
from gpunode.runtimes import runtime_lock
from gpunode.schema.distros import DistroSpec
from gpunode.schema.inference import RuntimeInstall, Service
from gpunode.schema.node import NodeConfig
from gpunode.schema.runtimes import PROFILES


@deploy("gpunode inference")
def inference_systemd() -> None:
    config, spec = node_and_distro(host)
    inf = config.inference
    # Services listed in nomad.jobs run as Nomad jobs (gpunode nomad run), never as units too.
    services = {n: s for n, s in inf.services.items() if n not in config.nomad.jobs}
    if not services:
        return  # nothing declared: no fact, no operation
    used = {svc.runtime for svc in services.values()}
    for path in (units.MODEL_STORE, units.SERVICES_DIR, units.CACHE_DIR):
        files.directory(
            name="Inference directory", path=path, user="root", group="root", mode="755"
        )
    installs = {rt: _install_runtime(rt, inf.runtimes[rt], spec) for rt in sorted(used)}

    minors = host.get_fact(NvidiaGpuMinors) if any(s.gpus for s in services.values()) else {}
    present = host.get_fact(StoreDigests, store=units.MODEL_STORE)
    switched = []
    provenance: dict[str, dict[str, object]] = {}
    for name, svc in services.items():
        devices = units.gpu_devices(svc, minors)
        if devices is None:
            missing = [u for u in svc.gpus if u.startswith("GPU-") and u not in minors]
            fail(
                name="Check the service's GPUs are on the host",
                message=(
                    f"host {host.name}: inference.services.{name}.gpus: {', '.join(missing)} "
                    f"not found (GPUs here: {', '.join(sorted(minors)) or 'none'})"
                ),
            )
            continue
        switched.append(_service(name, svc, config, installs[svc.runtime], devices, present))
        provenance[name] = {
            "runtime": svc.runtime,
            "runtime_version": installs[svc.runtime].version,
            "model_uri": svc.model.uri,
            "model_sha256": svc.model.sha256,
            "unit": units.unit_name(name),
        }
    if switched:
        prune(
            name="Keep the newest model versions",
            store=units.MODEL_STORE,
            link_globs=[f"{units.SERVICES_DIR}/*/current", f"{units.SERVICES_DIR}/*/previous"],
            keep=inf.keep_versions,
            _if=any_changed(*switched),
        )
    record("inference", provenance)


def _install_runtime(runtime: str, install: RuntimeInstall, spec: DistroSpec) -> units.Installed:
    profile = PROFILES[runtime]
    binary = install.binary or profile.executable[install.method]
    if install.method == "artifact":
        assert install.artifact is not None
        art = install.artifact
        files.directory(
            name="Runtime store", path=units.RUNTIME_STORE, user="root", group="root", mode="755"
        )
        op = fetch(
            name="Fetch the runtime",
            store=units.RUNTIME_STORE,
            uri=art.uri,
            sha256=art.sha256,
            present=host.get_fact(StoreDigests, store=units.RUNTIME_STORE),
            entry="root",
            unpack=True,
        )
        root = f"{units.RUNTIME_STORE}/sha256/{art.sha256}/root"
        return units.Installed(f"{root}/{binary}", root, f"sha256:{art.sha256}", [op])
    if install.method == "pip":
        # the lock was checked at config load (gpunode/runtimes.py); its digest names the
        # venv, so a new lock gets a new venv with nothing left of the old one
        lock = runtime_lock(install)
        pins = sorted(install.packages)
        key = json.dumps([pins, install.python, install.index_url, lock.sha256]).encode()
        venv = f"{units.VENV_DIR}/{runtime}-{hashlib.sha256(key).hexdigest()[:12]}"
        files.directory(
            name="Runtime venvs", path=units.VENV_DIR, user="root", group="root", mode="755"
        )
        files.put(
            name="Runtime lock file",
            src=io.BytesIO(lock.text.encode()),
            dest=f"{venv}.lock.txt",
            user="root",
            group="root",
            mode="644",
        )
        made = pip.virtualenv(name="Runtime venv", path=venv, python=install.python, venv=True)
        changed = [made]
        if lock.missing(host.get_fact(PipPackages, pip=f"{venv}/bin/pip")):
            changed.append(
                server.shell(
                    name="Runtime packages (locked, hash-checked)",
                    commands=[
                        install_command(f"{venv}/bin/pip", f"{venv}.lock.txt", install.index_url)
                    ],
                )
            )
        # the service user reads and runs the venv whatever the umask of gpunode's session
        # (pam_umask applies login.defs' UMASK, 027 by default, on Ubuntu)
        server.shell(
            name="Runtime venv readable by its service",
            commands=[f"chmod -R u+rwX,go+rX,go-w {shlex.quote(venv)}"],
            _if=any_changed(*changed),
        )
        return units.Installed(f"{venv}/{binary}", None, " ".join(pins), changed)
    assert install.package and install.version
    if spec.family == "apt":
        op = apt.packages(name="Runtime package", packages=[f"{install.package}={install.version}"])
    else:
        op = dnf.packages(name="Runtime package", packages=[f"{install.package}-{install.version}"])
    return units.Installed(binary, None, f"{install.package} {install.version}", [op])


def _service(
    name: str,
    svc: Service,
    config: NodeConfig,
    installed: units.Installed,
    devices: list[str],
    present: list[str],
):
    user = units.user_name(name)
    unit = units.unit_name(name)
    server.group(name="Service group", group=user, system=True)
    server.user(  # noqa: S604 - `shell` is the login shell, not a subprocess flag
        name="Service user",
        user=user,
        group=user,
        system=True,
        shell="/usr/sbin/nologin",
        home=units.cache_dir(name),
        ensure_home=False,
    )
    files.directory(
        name="Service directory",
        path=units.service_dir(name),
        user="root",
        group="root",
        mode="755",
    )
    files.directory(
        name="Service cache (its only writable path)",
        path=units.cache_dir(name),
        user=user,
        group=user,
        mode="750",
    )
    fetch(
        name="Fetch the model",
        store=units.MODEL_STORE,
        uri=svc.model.uri,
        sha256=svc.model.sha256,
        present=present,
        entry="model",
        unpack=svc.model.format == "tar",
    )
    sw = switch(
        name="Switch the model link",
        directory=units.service_dir(name),
        target=f"{units.MODEL_STORE}/sha256/{svc.model.sha256}",
        links=host.get_fact(Links, directory=units.service_dir(name)),
    )
    values = units.render_values(name, svc, config, installed)
    unit_op = files.template(
        name="Inference unit",
        src=str(units.UNIT_TEMPLATE),
        dest=f"{units.UNIT_DIR}/{unit}",
        mode="644",
        user="root",
        group="root",
        jinja_env_kwargs=units.JINJA_OPTIONS,
        ctx=values,
        devices=devices,
    )
    inputs = [unit_op, sw, *installed.changed]
    if svc.api_key_secret:
        # The secret's version (recorded by the secrets role earlier in this run; never the
        # value) in a stamp: a rotated key restarts the service in the same run.
        version = recorded(host.name).get("secrets", {}).get(svc.api_key_secret, "unmanaged")
        inputs.append(
            files.put(
                name="Secret version the service runs with",
                src=io.StringIO(f"{svc.api_key_secret} {version}\n"),
                dest=f"{units.service_dir(name)}/secret.version",
                mode="644",
                user="root",
                group="root",
            )
        )
    systemd.daemon_reload(name="Reload systemd (a unit changed)", _if=unit_op.did_change)
    if not svc.enabled:
        systemd.service(
            name="Inference service stopped", service=unit, running=False, enabled=False
        )
        return sw
    systemd.service(name="Inference service enabled", service=unit, running=None, enabled=True)
    running = host.get_fact(SystemdStatus, services=[unit]).get(unit, False)
    start = start_unit(name="Inference service running", unit=unit, running=bool(running))
    changed = any_changed(*inputs)
    restart = restart_unit(
        name="Restart the service (its unit, runtime, model or key changed)",
        unit=unit,
        _if=lambda: changed() and not start.did_change(),
    )
    wait_healthy(
        name="Wait until the service is healthy",
        url=units.local_url(svc, PROFILES[svc.runtime].health_path),
        timeout=svc.health_timeout,
        unit=unit,
        _if=any_changed(start, restart),
    )
    return sw
