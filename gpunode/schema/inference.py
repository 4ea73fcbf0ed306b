"""Inference services: runtime installs, model artifacts and hardened systemd units.

``inference:``: every default is here, next to its field. Runtimes are profiles
(gpunode/schema/runtimes.py); the role is roles/inference_systemd.py; the unit and the
node paths are gpunode/inference.py; rollouts are gpunode/commands/rollout.py.

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

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from gpunode.schema.planner import ModelFootprint
from gpunode.schema.runtimes import PROFILES, InstallMethod, RuntimeName
from gpunode.schema.types import (
    AbsPath,
    ExtraArg,
    GpuUuid,
    IpAddress,
    MemLimit,
    Model,
    PackageName,
    PackageVersion,
    Pin,
    Program,
    RelPath,
    SecretName,
    ServedName,
    ServiceName,
    Sha256,
    UnprivilegedPort,
    Uri,
)


class Artifact(Model):
    """A file fetched onto the node by URI and verified by sha256 before use."""

    uri: Uri
    """Where the file comes from: http(s)://mirror/... or file:///mnt/mirror/..."""
    sha256: Sha256
    """The sha256 of the file at uri (lowercase hex)."""
    format: Literal["file", "tar"] = "file"
    """file: used as it is; tar: unpacked (.tar, .tar.gz, .tar.xz)."""


class ModelSpec(Artifact):
    """The model a service serves: a file or tarball fetched onto the node by URI and verified
    by sha256 before use."""

    served_name: ServedName | None = None
    """The name clients ask for; default: the service name."""
    subpath: RelPath | None = None
    """Tar models: the path inside the archive to serve."""
    footprint: ModelFootprint | None = None
    """Unset: not checked. A GPU service's footprint is checked against the declared
    `gpu.model` at config load (gpunode/planner.py)."""


class RuntimeInstall(Model):
    """How one runtime gets onto the node."""

    method: InstallMethod
    """pip: exact pins into the runtime's own venv; package: a distro package at an exact
    version; artifact: a tarball of the server."""
    packages: list[Pin] = Field(default_factory=list)
    """For method pip (required there): exact pins, e.g. vllm==0.6.3."""
    python: AbsPath = "/usr/bin/python3"
    """For method pip: the Python the venv is made with."""
    index_url: Uri | None = None
    """For method pip: the site's package mirror."""
    lock: AbsPath | None = None
    """For method pip: a lock file on the deploying machine (every package as
    `name==version --hash=sha256:...`, written by scripts/lock.py); default: the repository's
    `locks/runtimes/<pins>.txt`. pip installs it with `--require-hashes`, wheels only."""
    package: PackageName | None = None
    """For method package (required there): the distro package name."""
    version: PackageVersion | None = None
    """For method package (required there): the exact package version."""
    artifact: Artifact | None = None
    """For method artifact (required there): a tarball of the server (bin/, lib/), format
    tar."""
    binary: Program | None = None
    """The server program: default from the runtime profile."""

    @model_validator(mode="after")
    def _method_fields(self) -> RuntimeInstall:
        need = {"pip": "packages", "package": "package", "artifact": "artifact"}[self.method]
        if not getattr(self, need):
            raise ValueError(f"method {self.method} needs {need} (allowed: set {need})")
        if self.lock and self.method != "pip":
            raise ValueError("lock is for method pip (allowed: unset it)")
        if self.method == "package" and not self.version:
            raise ValueError("method package needs version (allowed: the exact package version)")
        if self.method == "artifact" and self.artifact and self.artifact.format != "tar":
            raise ValueError("a runtime artifact is a tarball (allowed: artifact.format: tar)")
        return self


class Service(Model):
    """One inference server: one systemd unit, one model, its own ports and GPUs."""

    OPTIONS: ClassVar[frozenset[str]] = frozenset({"extra_args"})  # server flags, by design

    runtime: RuntimeName
    """The runtime profile; it needs an install entry in `inference.runtimes`."""
    model: ModelSpec
    """The model a service serves."""
    listen: IpAddress = "0.0.0.0"  # noqa: S104
    """The IP address the server listens on (0.0.0.0 or :: for every address)."""
    port: UnprivilegedPort
    """The API (and, for vLLM/llama.cpp, metrics) port; opened to network.app_cidrs."""
    grpc_port: UnprivilegedPort | None = None
    """triton only: the gRPC port; default port + 1."""
    metrics_port: UnprivilegedPort | None = None
    """triton only: the metrics port; default port + 2."""
    gpus: list[GpuUuid] = Field(default_factory=list)
    """The service's GPUs by UUID, each in one service only; empty: CPU only."""
    tensor_parallel: Annotated[int, Field(ge=1, le=64)] = 1
    """vLLM: = len(gpus); 1 for the other runtimes."""
    context_length: Annotated[int, Field(ge=128, le=10_000_000)] | None = None
    """Tokens of context; default: the model's (Triton takes it from the model only)."""
    threads: Annotated[int, Field(ge=1, le=1024)] | None = None
    """llama.cpp only: CPU threads."""
    api_key_secret: SecretName | None = None
    """A name in `secrets:`; its env variable is the runtime's."""
    memory_max: MemLimit = "90%"
    """systemd `MemoryMax=` (size, percent of RAM, or infinity)."""
    limit_memlock: MemLimit = "infinity"
    """`LimitMEMLOCK=`: pinned host memory for CUDA."""
    min_free_mib: Annotated[int, Field(ge=0)] = 0
    """GPU units: the probe's `--min-free-mib` (MiB free on each GPU before the unit
    starts)."""
    extra_args: list[ExtraArg] = Field(default_factory=list)
    """Appended to the command line."""
    health_timeout: Annotated[int, Field(ge=5, le=3600)] = 180
    """Seconds to become healthy."""
    enabled: bool = True
    """false: the unit is stopped and disabled, its files stay."""

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
    """One entry per runtime a service uses."""
    services: dict[ServiceName, Service] = Field(default_factory=dict)
    """Inference services by name; each is the systemd unit
    `gpunode-inference-<name>.service` (unless it is listed in `nomad.jobs`)."""
    keep_versions: Annotated[int, Field(ge=1, le=50)] = 3
    """Model versions kept in the store (besides those a service's current/previous link
    points at)."""
