"""Inference services on a node: the paths and names derived from a service, the ports it
opens, and the checks of ``inference:`` against the rest of a node's config.

The section (every default) is in gpunode/schema/inference.py; the role is
roles/inference_systemd.py; rollouts are gpunode/commands/rollout.py.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from pyinfra.api.util import get_template

from gpunode import gateway
from gpunode.gpus import capacity
from gpunode.paths import TEMPLATES
from gpunode.planner import check_placement
from gpunode.render import systemd_assignment, systemd_command_line
from gpunode.runtimes import check_locks, command_line
from gpunode.schema.inference import ModelSpec, Service
from gpunode.schema.node import Connection, NodeConfig
from gpunode.schema.runtimes import PROFILES
from gpunode.schema.types import listed_twice

# --- node paths (one place) ----------------------------------------------------------------
MODEL_STORE = "/var/lib/gpunode/models"  # <MODEL_STORE>/sha256/<digest>/model
RUNTIME_STORE = "/var/lib/gpunode/runtimes"  # <RUNTIME_STORE>/sha256/<digest>/root
SERVICES_DIR = "/var/lib/gpunode/inference"  # <SERVICES_DIR>/<svc>/{current,previous}
CACHE_DIR = "/var/cache/gpunode/inference"  # <CACHE_DIR>/<svc>: the unit's only writable path
VENV_DIR = "/opt/gpunode/venvs"  # pip installs: <VENV_DIR>/<runtime>-<sha12 of the pins>
PROBE = "/usr/local/sbin/gpunode-probe"
UNIT_DIR = "/etc/systemd/system"


# --- names derived from a service name -----------------------------------------------------


def unit_name(service: str) -> str:
    return f"gpunode-inference-{service}.service"


def user_name(service: str) -> str:
    return f"gpunode-{service}"


def service_dir(service: str) -> str:
    return f"{SERVICES_DIR}/{service}"


def cache_dir(service: str) -> str:
    return f"{CACHE_DIR}/{service}"


def model_path(service: str, spec: ModelSpec) -> str:
    """What the server is given: always through the `current` link, so switching the link
    (or reverting it) changes the model without changing the unit."""
    path = f"{service_dir(service)}/current/model"
    return f"{path}/{spec.subpath}" if spec.subpath else path


def secret_env_file(config: NodeConfig, name: str) -> str:
    return config.secrets[name].dest_for(name)


# --- checks at config load -----------------------------------------------------------------


def check_host(where: str, config: NodeConfig, connection: Connection) -> list[str]:
    """Checks that need the merged config (and the host's connection); [] when fine."""
    problems: list[str] = []
    inf = config.inference
    ports: dict[int, str] = {}
    gpus: dict[str, str] = {}
    for name, svc in inf.services.items():
        at = f"{where}: inference.services.{name}"
        profile = PROFILES[svc.runtime]
        if svc.runtime not in inf.runtimes:
            problems.append(
                f"{at}.runtime: {svc.runtime} has no install entry (allowed: add "
                f"inference.runtimes.{svc.runtime} with method pip, package or artifact)"
            )
        own_metrics = svc.effective_metrics_port() if profile.metrics_port == "own" else None
        for kind, port in (
            ("port", svc.port),
            ("grpc_port", svc.effective_grpc_port()),
            ("metrics_port", own_metrics),
        ):
            if port is None:
                continue
            if port in ports:
                problems.append(
                    f"{at}.{kind}: {port} is already used by {ports[port]} "
                    "(allowed: a port no other service on the node uses)"
                )
            ports[port] = f"inference.services.{name}"
        if profile.gpu_only and not svc.gpus:
            problems.append(
                f"{at}.gpus: {profile.title} needs a GPU (allowed: the UUIDs of the GPUs it "
                "uses, e.g. [GPU-9221d5d1-b60b-a624-bf14-0a1819cfda3b])"
            )
        for uuid in svc.gpus:
            if uuid in gpus:
                problems.append(
                    f"{at}.gpus: {uuid} is already used by {gpus[uuid]} "
                    "(allowed: each GPU in one service)"
                )
            gpus[uuid] = f"inference.services.{name}"
        if listed_twice(svc.gpus):
            problems.append(f"{at}.gpus: a GPU is listed twice (allowed: each UUID once)")
        if svc.gpus and config.gpu.count is not None and len(svc.gpus) > config.gpu.count:
            problems.append(
                f"{at}.gpus: {len(svc.gpus)} GPUs but the node declares gpu.count "
                f"{config.gpu.count} (allowed: at most gpu.count)"
            )
        if svc.tensor_parallel > 1 and not profile.tensor_parallel:
            problems.append(
                f"{at}.tensor_parallel: {profile.title} has no tensor-parallel flag "
                "(allowed: 1; it uses every GPU listed in gpus)"
            )
        if profile.tensor_parallel and svc.gpus and svc.tensor_parallel != len(svc.gpus):
            problems.append(
                f"{at}.tensor_parallel: {svc.tensor_parallel} but {len(svc.gpus)} GPUs listed "
                f"(allowed: {len(svc.gpus)}, one shard per GPU)"
            )
        if svc.context_length is not None and not profile.context_length:
            problems.append(
                f"{at}.context_length: {profile.title} takes it from the model's config "
                "(allowed: unset it)"
            )
        if svc.threads is not None and svc.runtime != "llamacpp":
            problems.append(f"{at}.threads: only llamacpp has it (allowed: unset it)")
        if profile.metrics_port == "api" and (svc.grpc_port or svc.metrics_port):
            problems.append(
                f"{at}: grpc_port/metrics_port: {profile.title} serves metrics on its API "
                "port and has no gRPC port (allowed: unset them)"
            )
        if profile.model_format != "any" and svc.model.format != profile.model_format:
            what = "a single model file" if profile.model_format == "file" else "a tarball"
            problems.append(
                f"{at}.model.format: {svc.model.format}, but {profile.title} loads {what} "
                f"(allowed: {profile.model_format})"
            )
        if svc.model.subpath and svc.model.format != "tar":
            problems.append(
                f"{at}.model.subpath: only a tar model has one (allowed: unset it, or format: tar)"
            )
        problems += _check_secret(at, config, name, svc)
        problems += _check_footprint(at, config, name, svc)
    problems += check_locks(where, inf.runtimes)
    return problems


def _check_secret(at: str, config: NodeConfig, name: str, svc: Service) -> list[str]:
    if svc.api_key_secret is None:
        return []
    profile = PROFILES[svc.runtime]
    if profile.api_key_env is None:
        return [
            f"{at}.api_key_secret: {profile.title} has no API key of its own (allowed: unset "
            "it and put the service behind an authenticating proxy)"
        ]
    secret = config.secrets.get(svc.api_key_secret)
    if secret is None:
        return [
            f"{at}.api_key_secret: {svc.api_key_secret!r} is not a declared secret (allowed: "
            f"{', '.join(config.secrets) or 'none declared: add it under secrets:'})"
        ]
    problems = []
    if secret.env_name() != profile.api_key_env:
        problems.append(
            f"{at}.api_key_secret: secrets.{svc.api_key_secret} writes the variable "
            f"{secret.env_name()}, {profile.title} reads {profile.api_key_env} (allowed: set "
            f"secrets.{svc.api_key_secret}.env: {profile.api_key_env})"
        )
    if secret.owner != "root" or secret.group not in ("root", user_name(name)):
        problems.append(
            f"{at}.api_key_secret: secrets.{svc.api_key_secret} is owned "
            f"{secret.owner}:{secret.group} (allowed: root:{user_name(name)} or root:root; "
            "systemd reads the EnvironmentFile as root)"
        )
    return problems


def _check_footprint(at: str, config: NodeConfig, name: str, svc: Service) -> list[str]:
    """The capacity planner: the model must fit the GPUs the service is given."""
    footprint = svc.model.footprint
    if footprint is None or not svc.gpus:
        return []
    if svc.context_length is not None:  # the server runs with the service's context length
        footprint = footprint.model_copy(update={"context_length": svc.context_length})
    cap = capacity(config)
    if cap is None:
        return [
            f"{at}.model.footprint: the node declares no gpu.model, so the planner cannot "
            "check the model fits (allowed: set gpu.model, or unset the footprint)"
        ]
    where, _, node = at.partition(": inference.services.")[0].rpartition("host ")
    return check_placement(
        where=at.partition(": inference.services.")[0],
        node=node or where,
        service=f"inference.services.{name}",
        footprint=footprint,
        gpus_have_bytes=cap[0],
        gpu_count=len(svc.gpus),
        model=svc.model.served_name or name,
    )


def app_ports(config: NodeConfig) -> list[tuple[str, int]]:
    """(protocol, port) of every inference endpoint on the node; the firewall opens them
    to network.app_cidrs."""
    front = gateway.fronted(config)
    remote = config.gateway_sources  # fronted by gateways on other hosts: open to them only
    ports: list[tuple[str, int]] = list(gateway.app_ports(config))
    for name, svc in config.inference.services.items():
        if not svc.enabled or name in front or name in remote:  # through a gateway only
            continue
        ports.append(("tcp", svc.port))
        grpc = svc.effective_grpc_port()
        if grpc is not None:
            ports.append(("tcp", grpc))
    return sorted(set(ports))


def warnings(config: NodeConfig) -> list[str]:
    """What every run prints about this node's inference services (gpunode/inventory.py's
    report): a server whose API key leaves some routes open, listening beyond loopback."""
    found = []
    for name, svc in config.inference.services.items():
        routes = PROFILES[svc.runtime].open_routes
        if name in config.gateway_sources:  # reachable from its gateways only
            continue
        if svc.enabled and routes and not ipaddress.ip_address(svc.listen).is_loopback:
            found.append(
                f"inference.services.{name}: {PROFILES[svc.runtime].title} listens on "
                f"{svc.listen}:{svc.port} and answers {', '.join(routes)} without its API key "
                "(its key guards only some routes): every address in network.app_cidrs can "
                "use them; listen on 127.0.0.1 behind a front door, or keep app_cidrs to "
                "trusted clients"
            )
    return found


def metrics_endpoints(config: NodeConfig) -> list[tuple[str, int, str]]:
    """(service, port, path) of each service's Prometheus endpoint, for monitoring."""
    return [
        (name, svc.effective_metrics_port(), PROFILES[svc.runtime].metrics_path)
        for name, svc in config.inference.services.items()
        if svc.enabled
    ]


# --- the unit ----------------------------------------------------------------------------------

UNIT_TEMPLATE = TEMPLATES / "inference" / "service.j2"
JINJA_OPTIONS = {"trim_blocks": True, "lstrip_blocks": True}
START_LIMIT_INTERVAL = 600  # seconds: Restart=on-failure gives up after BURST starts in this
START_LIMIT_BURST = 5


@dataclass(frozen=True)
class Installed:
    executable: str
    root: str | None  # the unpacked artifact (for lib/ and backends/)
    version: str  # for provenance: the pins, the package version or the artifact digest
    changed: list  # the operations whose change means "restart the services using it"


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
        "environment_lines": [systemd_assignment(k, v) for k, v in environment],
        "gpus": svc.gpus,
        "probe": PROBE,
        "min_free_mib": svc.min_free_mib,
        "exec_start": systemd_command_line(argv),
        "health_timeout": svc.health_timeout,
        "memory_max": svc.memory_max,
        "limit_memlock": svc.limit_memlock,
        "start_limit_interval": START_LIMIT_INTERVAL,
        "start_limit_burst": START_LIMIT_BURST,
    }


def render_unit(values: dict[str, object], devices: list[str]) -> str:
    """The unit file's text (what files.template writes)."""
    return get_template(str(UNIT_TEMPLATE), jinja_env_kwargs=JINJA_OPTIONS).render(
        ctx=values, devices=devices
    )
