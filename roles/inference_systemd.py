"""Inference services as hardened systemd units.

For each service in ``NodeConfig.inference.services`` (gpunode/inference.py, where every
default is documented): the runtime is installed (a pinned pip venv, a distro package, or a
tarball artifact checked by sha256), the model is fetched into the content-addressed store
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
from dataclasses import dataclass

from pyinfra import host
from pyinfra.api import FactBase, deploy, operation
from pyinfra.api.util import get_template
from pyinfra.facts.systemd import SystemdStatus
from pyinfra.operations import apt, dnf, files, pip, server, systemd
from pyinfra.operations.util import any_changed

from gpunode import distros
from gpunode.artifacts import Links, StoreDigests, fetch, prune, switch
from gpunode.config import NodeConfig
from gpunode.inference import (
    CACHE_DIR,
    MODEL_STORE,
    PROBE,
    RUNTIME_STORE,
    SERVICES_DIR,
    UNIT_DIR,
    VENV_DIR,
    RuntimeInstall,
    Service,
    cache_dir,
    model_path,
    secret_env_file,
    service_dir,
    unit_name,
    user_name,
)
from gpunode.inventory import node_config
from gpunode.operations import fail
from gpunode.paths import TEMPLATES
from gpunode.provenance import record, recorded
from gpunode.runtimes import PROFILES, command_line

T = TEMPLATES / "inference"
START_LIMIT_INTERVAL = 600  # seconds: Restart=on-failure gives up after BURST starts in this
START_LIMIT_BURST = 5


class NvidiaGpuMinors(FactBase):
    """
    GPU UUID -> device minor (``/dev/nvidia<minor>``), from the driver's
    ``/proc/driver/nvidia/gpus/*/information`` files; ``{}`` without the driver.

    .. code:: python

        {"GPU-9221d5d1-b60b-a624-bf14-0a1819cfda3b": 5}
    """

    @staticmethod
    def default() -> dict[str, int]:
        return {}

    def command(self) -> str:
        return (
            "for f in /proc/driver/nvidia/gpus/*/information; do [ -r \"$f\" ] && "
            "grep -E '^(GPU UUID|Device Minor):' \"$f\"; done; true"
        )

    def process(self, output: list[str]) -> dict[str, int]:
        minors: dict[str, int] = {}
        uuid = None
        for line in output:
            key, _, value = line.partition(":")
            if key.strip() == "GPU UUID":
                uuid = value.strip()
            elif key.strip() == "Device Minor" and uuid:
                minors[uuid] = int(value.strip())
                uuid = None
        return minors


@dataclass(frozen=True)
class Installed:
    executable: str
    root: str | None  # the unpacked artifact (for lib/ and backends/)
    version: str  # for provenance: the pins, the package version or the artifact digest
    changed: list  # the operations whose change means "restart the services using it"


@operation()
def start_unit(unit: str, running: bool):
    """
    Start a unit that is not running (``running``: the ``SystemdStatus`` fact), first clearing
    a failed state, so a unit that hit its start limit starts again once it is fixed.

    .. code:: python

        start_unit(name="Service running", unit="gpunode-inference-chat.service",
                   running=host.get_fact(SystemdStatus, services=[unit]).get(unit, False))
    """
    if running:
        host.noop(f"{unit} is running")
        return
    q = shlex.quote(unit)
    yield f"systemctl reset-failed {q} 2>/dev/null || true; systemctl start {q}"


@operation(is_idempotent=False)
def restart_unit(unit: str):
    """
    Restart a unit (clearing a failed state first). Run it ``_if`` something it uses changed.

    .. code:: python

        restart_unit(name="Restart", unit="gpunode-inference-chat.service", _if=unit.did_change)
    """
    q = shlex.quote(unit)
    yield f"systemctl reset-failed {q} 2>/dev/null || true; systemctl restart {q}"


@operation(is_idempotent=False)
def wait_healthy(url: str, timeout: int, unit: str):
    """
    Wait on the node until ``url`` answers 2xx, or fail after ``timeout`` seconds with the
    unit's status. Run it ``_if`` the unit was (re)started.

    .. code:: python

        wait_healthy(name="Wait for health", url="http://127.0.0.1:8080/health",
                     timeout=180, unit="gpunode-inference-chat.service", _if=start.did_change)
    """
    q = shlex.quote
    yield (
        f"end=$(( $(date +%s) + {int(timeout)} )); "
        f"until curl -fsS -o /dev/null --max-time 5 {q(url)}; do "
        f"if systemctl is-failed --quiet {q(unit)}; then "
        f'echo "gpunode: {unit} failed (start limit reached) before {url} was healthy" >&2; '
        f"systemctl status --no-pager --lines=15 {q(unit)} >&2; exit 1; fi; "
        f'if [ "$(date +%s)" -ge "$end" ]; then '
        f'echo "gpunode: {unit} is not healthy at {url} after {int(timeout)}s" >&2; '
        f"systemctl status --no-pager --lines=15 {q(unit)} >&2; exit 1; fi; sleep 1; done"
    )


def local_url(svc: Service, path: str) -> str:
    address = svc.listen
    if address in ("0.0.0.0", "::"):  # noqa: S104 - a wildcard listen answers on loopback
        address = "127.0.0.1" if address == "0.0.0.0" else "::1"  # noqa: S104
    if ":" in address:
        address = f"[{address}]"
    return f"http://{address}:{svc.port}{path}"


def gpu_devices(svc: Service, minors: dict[str, int]) -> list[str] | None:
    """DeviceAllow= entries for the service's GPUs; None when a GPU is not on the host."""
    if not svc.gpus:
        return []
    devices = ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"]
    for uuid in svc.gpus:
        if uuid.startswith("MIG-"):
            devices.append("char-nvidia-caps")
            continue
        if uuid not in minors:
            return None
        devices.append(f"/dev/nvidia{minors[uuid]}")
    return sorted(set(devices))


def render_values(
    name: str, svc: Service, config: NodeConfig, installed: Installed
) -> dict[str, object]:
    """Everything the unit template needs for one service (pure: tested without a host)."""
    profile = PROFILES[svc.runtime]
    cache = cache_dir(name)
    values: dict[str, object] = {
        "model": model_path(name, svc.model),
        "listen": svc.listen,
        "port": svc.port,
        "served_name": svc.model.served_name or name,
        "tensor_parallel": svc.tensor_parallel if profile.tensor_parallel else None,
        "context_length": svc.context_length,
        "threads": svc.threads,
        "gpu_layers": 999 if svc.gpus and svc.runtime == "llamacpp" else None,
        "grpc_port": svc.effective_grpc_port(),
        "metrics_port": svc.effective_metrics_port() if profile.metrics_port == "own" else None,
        "runtime_root": installed.root,
        "cache": cache,
    }
    argv = [installed.executable, *command_line(profile, values), *svc.extra_args]
    environment = [(k, v.format(cache=cache)) for k, v in sorted(profile.env.items())]
    if installed.root and profile.lib_dirs:
        libs = ":".join(f"{installed.root}/{d}" for d in profile.lib_dirs)
        environment.append(("LD_LIBRARY_PATH", libs))
    if svc.gpus:
        environment.append(("CUDA_VISIBLE_DEVICES", ",".join(svc.gpus)))
        environment.append(("CUDA_DEVICE_ORDER", "PCI_BUS_ID"))
    else:
        environment.append(("CUDA_VISIBLE_DEVICES", ""))
    return {
        "name": name,
        "profile": profile,
        "user": user_name(name),
        "service_dir": service_dir(name),
        "cache": cache,
        "env_file": secret_env_file(config, svc.api_key_secret) if svc.api_key_secret else None,
        "environment": environment,
        "gpus": svc.gpus,
        "probe": PROBE,
        "min_free_mib": svc.min_free_mib,
        "exec_start": " ".join(argv),
        "health_timeout": svc.health_timeout,
        "memory_max": svc.memory_max,
        "limit_memlock": svc.limit_memlock,
        "start_limit_interval": START_LIMIT_INTERVAL,
        "start_limit_burst": START_LIMIT_BURST,
    }


def render_unit(values: dict[str, object], devices: list[str]) -> str:
    """The unit file's text (what files.template writes)."""
    return get_template(str(T / "service.j2"), jinja_env_kwargs=_jinja()).render(
        ctx=values, devices=devices
    )


def _jinja() -> dict[str, bool]:
    return {"trim_blocks": True, "lstrip_blocks": True}


@deploy("gpunode inference")
def inference_systemd() -> None:
    config = node_config(host)
    inf = config.inference
    # Services listed in nomad.jobs run as Nomad jobs (gpunode nomad run), never as units too.
    services = {n: s for n, s in inf.services.items() if n not in config.nomad.jobs}
    if not services:
        return  # nothing declared: no fact, no operation
    assert config.distro is not None  # guaranteed by config loading
    used = {svc.runtime for svc in services.values()}
    for path in (MODEL_STORE, SERVICES_DIR, CACHE_DIR):
        files.directory(name="Inference directory", path=path, user="root", group="root",
                        mode="755")
    installs = {rt: _install_runtime(rt, inf.runtimes[rt], config) for rt in sorted(used)}

    minors = (
        host.get_fact(NvidiaGpuMinors) if any(s.gpus for s in services.values()) else {}
    )
    present = host.get_fact(StoreDigests, store=MODEL_STORE)
    switched = []
    provenance: dict[str, dict[str, object]] = {}
    for name, svc in services.items():
        devices = gpu_devices(svc, minors)
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
            "unit": unit_name(name),
        }
    if switched:
        prune(
            name="Keep the newest model versions",
            store=MODEL_STORE,
            link_globs=[f"{SERVICES_DIR}/*/current", f"{SERVICES_DIR}/*/previous"],
            keep=inf.keep_versions,
            _if=any_changed(*switched),
        )
    record("inference", provenance)


def _install_runtime(runtime: str, install: RuntimeInstall, config: NodeConfig) -> Installed:
    profile = PROFILES[runtime]
    binary = install.binary or profile.executable[install.method]
    if install.method == "artifact":
        assert install.artifact is not None
        art = install.artifact
        files.directory(name="Runtime store", path=RUNTIME_STORE, user="root", group="root",
                        mode="755")
        op = fetch(
            name="Fetch the runtime",
            store=RUNTIME_STORE,
            uri=art.uri,
            sha256=art.sha256,
            present=host.get_fact(StoreDigests, store=RUNTIME_STORE),
            entry="root",
            unpack=True,
        )
        root = f"{RUNTIME_STORE}/sha256/{art.sha256}/root"
        return Installed(f"{root}/{binary}", root, f"sha256:{art.sha256}", [op])
    if install.method == "pip":
        pins = sorted(install.packages)
        key = json.dumps([pins, install.python, install.index_url]).encode()
        venv = f"{VENV_DIR}/{runtime}-{hashlib.sha256(key).hexdigest()[:12]}"
        files.directory(name="Runtime venvs", path=VENV_DIR, user="root", group="root",
                        mode="755")
        made = pip.virtualenv(name="Runtime venv", path=venv, python=install.python, venv=True)
        op = pip.packages(
            name="Runtime packages (pinned)",
            packages=pins,
            virtualenv=venv,
            extra_install_args=f"--index-url {install.index_url}" if install.index_url else None,
        )
        return Installed(f"{venv}/{binary}", None, " ".join(pins), [made, op])
    assert install.package and install.version
    spec = distros.get(config.distro or "")
    if spec.family == "apt":
        op = apt.packages(name="Runtime package", packages=[f"{install.package}={install.version}"])
    else:
        op = dnf.packages(name="Runtime package", packages=[f"{install.package}-{install.version}"])
    return Installed(binary, None, f"{install.package} {install.version}", [op])


def _service(
    name: str,
    svc: Service,
    config: NodeConfig,
    installed: Installed,
    devices: list[str],
    present: list[str],
):
    user = user_name(name)
    unit = unit_name(name)
    server.group(name="Service group", group=user, system=True)
    server.user(  # noqa: S604 - `shell` is the login shell, not a subprocess flag
        name="Service user",
        user=user,
        group=user,
        system=True,
        shell="/usr/sbin/nologin",
        home=cache_dir(name),
        ensure_home=False,
    )
    files.directory(name="Service directory", path=service_dir(name), user="root",
                    group="root", mode="755")
    files.directory(name="Service cache (its only writable path)", path=cache_dir(name),
                    user=user, group=user, mode="750")
    fetch(
        name="Fetch the model",
        store=MODEL_STORE,
        uri=svc.model.uri,
        sha256=svc.model.sha256,
        present=present,
        entry="model",
        unpack=svc.model.format == "tar",
    )
    sw = switch(
        name="Switch the model link",
        directory=service_dir(name),
        target=f"{MODEL_STORE}/sha256/{svc.model.sha256}",
        links=host.get_fact(Links, directory=service_dir(name)),
    )
    values = render_values(name, svc, config, installed)
    unit_op = files.template(
        name="Inference unit",
        src=str(T / "service.j2"),
        dest=f"{UNIT_DIR}/{unit}",
        mode="644",
        user="root",
        group="root",
        jinja_env_kwargs=_jinja(),
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
                dest=f"{service_dir(name)}/secret.version",
                mode="644",
            )
        )
    systemd.daemon_reload(name="Reload systemd (a unit changed)", _if=unit_op.did_change)
    if not svc.enabled:
        systemd.service(name="Inference service stopped", service=unit, running=False,
                        enabled=False)
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
        url=local_url(svc, PROFILES[svc.runtime].health_path),
        timeout=svc.health_timeout,
        unit=unit,
        _if=any_changed(start, restart),
    )
    return sw
