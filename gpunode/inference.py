"""Inference services: runtime installs, model artifacts and hardened systemd units.

Every default is here, next to its field. Runtimes are profiles (gpunode/runtimes.py);
the role is roles/inference_systemd.py; rollouts are gpunode/rollout.py.

.. code:: yaml

    inference:
      runtimes:
        llamacpp:
          method: artifact                    # pip | package | artifact
          artifact:
            uri: http://mirror.internal/gpunode/llama-server-0.3.36-linux-x86_64.tar.gz
            sha256: 5f1c...                   # of the file at uri
            format: tar
      services:
        chat:                                 # unit gpunode-inference-chat.service
          runtime: llamacpp
          port: 8080
          model:
            uri: file:///mnt/models/smollm2-135m-instruct-q4_1.gguf
            sha256: 9a0e...
          context_length: 4096
          api_key_secret: chat_api_key        # secrets.chat_api_key, env LLAMA_API_KEY

A node may run several services: one per GPU or GPU group, each on its own ports.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import AfterValidator, Field, StringConstraints, field_validator, model_validator

from gpunode.planner import ModelFootprint, check_placement
from gpunode.runtimes import PROFILES, InstallMethod, RuntimeName
from gpunode.schema import PATTERN_HELP, SIZE_RE, Model, PackageName

if TYPE_CHECKING:
    from gpunode.config import Connection, NodeConfig

# --- node paths (one place) ----------------------------------------------------------------
MODEL_STORE = "/var/lib/gpunode/models"  # <MODEL_STORE>/sha256/<digest>/model
RUNTIME_STORE = "/var/lib/gpunode/runtimes"  # <RUNTIME_STORE>/sha256/<digest>/root
SERVICES_DIR = "/var/lib/gpunode/inference"  # <SERVICES_DIR>/<svc>/{current,previous}
CACHE_DIR = "/var/cache/gpunode/inference"  # <CACHE_DIR>/<svc>: the unit's only writable path
VENV_DIR = "/opt/gpunode/venvs"  # pip installs: <VENV_DIR>/<runtime>-<sha12 of the pins>
PROBE = "/usr/local/sbin/gpunode-probe"
UNIT_DIR = "/etc/systemd/system"

SERVICE_NAME_RE = r"^[a-z][a-z0-9-]{0,22}$"
SHA256_RE = r"^[0-9a-f]{64}$"
# http(s) from a mirror, or file:// on a local mirror or NFS mount. No user:password@ (it
# would be printed with the command): mirrors that need credentials use ~/.netrc.
URI_RE = r"^(https?://[A-Za-z0-9.-]+(:[0-9]+)?|file://)/[A-Za-z0-9._~%+/=,-]*$"
GPU_UUID_RE = r"^(GPU|MIG)-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
PIN_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?==[A-Za-z0-9.+!_-]+$"
REL_PATH_RE = r"^[A-Za-z0-9_-][A-Za-z0-9._/-]*$"  # and no ".." part (_no_dotdot)
ARG_RE = r"^[A-Za-z0-9._/=:,+@-]+$"  # extra arguments: no shell or systemd specials

ServiceName = Annotated[str, StringConstraints(pattern=SERVICE_NAME_RE)]
Sha256 = Annotated[str, StringConstraints(pattern=SHA256_RE)]
Uri = Annotated[str, StringConstraints(pattern=URI_RE)]
GpuUuid = Annotated[str, StringConstraints(pattern=GPU_UUID_RE)]
Pin = Annotated[str, StringConstraints(pattern=PIN_RE)]

PATTERN_HELP.update(
    {
        SERVICE_NAME_RE: "a-z, 0-9 and '-', starting with a letter, at most 23 characters",
        SHA256_RE: "64 lowercase hex digits, as sha256sum prints them",
        URI_RE: "http(s)://host[:port]/path or file:///path, with no user:password@",
        GPU_UUID_RE: "a GPU or MIG UUID as nvidia-smi -L prints it, e.g. "
        "GPU-9221d5d1-b60b-a624-bf14-0a1819cfda3b",
        PIN_RE: "an exact pin name==version, e.g. vllm==0.6.3",
        REL_PATH_RE: "a relative path: letters, digits, '.', '_', '-', '/'",
        ARG_RE: "letters, digits and . _ / = : , + @ - (no spaces, quotes, $ or %)",
    }
)


def _no_dotdot(value: str) -> str:
    if ".." in value.split("/"):
        raise ValueError(f"{value!r} leaves its directory (allowed: a path inside it, no '..')")
    return value


RelPath = Annotated[str, StringConstraints(pattern=REL_PATH_RE), AfterValidator(_no_dotdot)]
ExtraArg = Annotated[str, StringConstraints(pattern=ARG_RE)]
Size = Annotated[str, StringConstraints(pattern=SIZE_RE)]
MemLimit = Annotated[str, StringConstraints(pattern=r"^([0-9]+[KMGT]?|[0-9]{1,2}%|infinity)$")]
Port = Annotated[int, Field(ge=1024, le=65535)]


class Artifact(Model):
    """A file fetched onto the node by URI and verified by sha256 before use."""

    uri: Uri  # http(s)://mirror/... or file:///mnt/mirror/...
    sha256: Sha256  # of the file at uri (lowercase hex)
    format: Literal["file", "tar"] = "file"  # tar: unpacked (.tar, .tar.gz, .tar.xz)


class ModelSpec(Artifact):
    """The model a service serves."""

    served_name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:/-]{1,128}$")] | None = (
        None  # the name clients ask for; default: the service name
    )
    subpath: RelPath | None = None  # tar models: the path inside the archive to serve
    # Size of the model for the capacity planner (gpunode/planner.py); unset: not checked.
    # A GPU service's footprint is checked against the declared gpu.model at config load.
    footprint: ModelFootprint | None = None


class RuntimeInstall(Model):
    """How one runtime gets onto the node."""

    method: InstallMethod
    packages: list[Pin] = Field(default_factory=list)  # pip: exact pins, e.g. vllm==0.6.3
    python: Annotated[str, StringConstraints(pattern=r"^/[A-Za-z0-9._/-]+$")] = "/usr/bin/python3"
    index_url: Uri | None = None  # pip: the site's package mirror
    package: PackageName | None = None  # package: the distro package name
    version: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9.+:~_-]+$")] | None = None
    artifact: Artifact | None = None  # artifact: a tarball of the server (bin/, lib/)
    binary: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._/-]+$")] | None = (
        None  # the server program: default from the runtime profile
    )

    @model_validator(mode="after")
    def _method_fields(self) -> RuntimeInstall:
        need = {"pip": "packages", "package": "package", "artifact": "artifact"}[self.method]
        if not getattr(self, need):
            raise ValueError(f"method {self.method} needs {need} (allowed: set {need})")
        if self.method == "package" and not self.version:
            raise ValueError("method package needs version (allowed: the exact package version)")
        if self.method == "artifact" and self.artifact and self.artifact.format != "tar":
            raise ValueError("a runtime artifact is a tarball (allowed: artifact.format: tar)")
        return self


class Service(Model):
    """One inference server: one systemd unit, one model, its own ports and GPUs."""

    runtime: RuntimeName
    model: ModelSpec
    listen: Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F.:]+$")] = "0.0.0.0"  # noqa: S104
    port: Port  # the API (and, for vLLM/llama.cpp, metrics) port; opened to network.app_cidrs
    grpc_port: Port | None = None  # triton: default port + 1
    metrics_port: Port | None = None  # triton: default port + 2
    gpus: list[GpuUuid] = Field(default_factory=list)  # by UUID; empty: CPU only
    tensor_parallel: Annotated[int, Field(ge=1, le=64)] = 1  # vLLM: = len(gpus)
    context_length: Annotated[int, Field(ge=128, le=10_000_000)] | None = None  # default: model
    threads: Annotated[int, Field(ge=1, le=1024)] | None = None  # llama.cpp CPU threads
    api_key_secret: str | None = None  # a name in `secrets:`; its env variable is the runtime's
    memory_max: MemLimit = "90%"  # systemd MemoryMax= (size, percent of RAM, or infinity)
    limit_memlock: MemLimit = "infinity"  # LimitMEMLOCK=: pinned host memory for CUDA
    min_free_mib: Annotated[int, Field(ge=0)] = 0  # GPU units: the probe's --min-free-mib
    extra_args: list[ExtraArg] = Field(default_factory=list)  # appended to the command line
    health_timeout: Annotated[int, Field(ge=5, le=3600)] = 180  # seconds to become healthy
    enabled: bool = True  # false: the unit is stopped and disabled, its files stay

    @field_validator("listen")
    @classmethod
    def _ip(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(
                f"{value!r} is not an IP address (allowed: 0.0.0.0, 127.0.0.1, ::, an address)"
            ) from None
        return value

    def effective_grpc_port(self) -> int | None:
        if self.runtime != "triton":
            return None
        return self.grpc_port or self.port + 1

    def effective_metrics_port(self) -> int:
        if PROFILES[self.runtime].metrics_port == "api":
            return self.port
        return self.metrics_port or self.port + 2


class Inference(Model):
    """The node's inference services."""

    runtimes: dict[RuntimeName, RuntimeInstall] = Field(default_factory=dict)
    services: dict[ServiceName, Service] = Field(default_factory=dict)
    keep_versions: Annotated[int, Field(ge=1, le=50)] = 3  # model versions kept in the store
    # (besides those a service's current/previous link points at)


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
        if len(set(svc.gpus)) != len(svc.gpus):
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
    from gpunode.gpus import capacity

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
    ports: list[tuple[str, int]] = []
    for svc in config.inference.services.values():
        if not svc.enabled:
            continue
        ports.append(("tcp", svc.port))
        grpc = svc.effective_grpc_port()
        if grpc is not None:
            ports.append(("tcp", grpc))
    return sorted(set(ports))


def metrics_endpoints(config: NodeConfig) -> list[tuple[str, int, str]]:
    """(service, port, path) of each service's Prometheus endpoint, for monitoring."""
    return [
        (name, svc.effective_metrics_port(), PROFILES[svc.runtime].metrics_path)
        for name, svc in config.inference.services.items()
        if svc.enabled
    ]
