"""``nomad:``: the Nomad client's settings and the inference services it runs as jobs.

Everything about Nomad that a node's config can say lives in :class:`Nomad` (every
default next to its field). ``roles/nomad_client.py`` installs and configures the
client agent from it; ``gpunode/nomad_jobs.py`` renders one Nomad job per inference
service listed in ``nomad.jobs`` (from the same service config the systemd units use);
``gpunode/commands/nomad.py`` plans and submits those jobs through the HTTP API
(gpunode/clients/nomad.py); gpunode/nomad.py checks the section and opens its ports.

Example (inventory YAML)::

    nomad:
      enabled: true
      version: "1.10.5"
      datacenter: gpu-dc1
      servers: ["10.0.0.10:4647", "10.0.0.11:4647"]
      address: https://nomad.example.com:4646
      jobs: [chat]
      acl_token_vault: {mount: secret, path: gpunode/nomad, key: token}
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

from gpunode.schema.types import (
    AbsPath,
    HttpUrl,
    Image,
    Model,
    Name,
    ServerAddr,
    Sha256,
    Version,
)

# Ports of a Nomad agent (Nomad docs, "Ports used"): HTTP API 4646/tcp; RPC 4647/tcp
# (client agents <-> servers); Serf WAN 4648/tcp+udp, used by servers to gossip,
# "it isn't required that Nomad clients can reach this address".
HTTP_PORT = 4646
RPC_PORT = 4647
SERF_PORT = 4648


class NomadTls(Model):
    """The agent's TLS (Nomad ``tls`` block): mutual TLS for HTTP and RPC.

    The files are placed on the node by whoever owns the PKI (the certificate and CA
    are public; the key file arrives through gpunode's secrets role, never through
    this role's operations). gpunode checks that they exist and points Nomad at them.
    """

    enabled: bool = True
    ca_file: AbsPath = "/etc/nomad.d/tls/ca.pem"
    cert_file: AbsPath = "/etc/nomad.d/tls/client.pem"
    key_file: AbsPath = "/etc/nomad.d/tls/client-key.pem"
    verify_server_hostname: bool = True  # the server cert must be server.<region>.nomad
    verify_https_client: bool = True  # HTTP API callers need a client certificate


class AclTokenVault(Model):
    """Where the controller reads the Nomad ACL token (Vault KV v2) used to submit jobs."""

    mount: Name = "secret"
    path: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._/-]+$")] = "gpunode/nomad"
    key: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]+$")] = "token"


class DevicePlugin(Model):
    """nomad-device-nvidia: HashiCorp's NVIDIA device plugin (a release zip)."""

    enabled: bool = True
    version: Version = "1.1.0"
    # Release zip (or a mirror of it) and its sha256; None: HashiCorp's release URL
    url: HttpUrl | None = None
    sha256: Sha256 | None = None  # required when enabled (checked at config load)
    fingerprint_period: Annotated[str, StringConstraints(pattern=r"^[0-9]+(s|m|h)$")] = "1m"
    ignored_gpu_ids: list[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9-]+$")]] = Field(
        default_factory=list
    )

    def release_url(self) -> str:
        return self.url or (
            f"https://releases.hashicorp.com/nomad-device-nvidia/{self.version}/"
            f"nomad-device-nvidia_{self.version}_linux_amd64.zip"
        )


class JobPolicy(Model):
    """Scheduling policy of every rendered job (Nomad ``update``, ``restart``,
    ``reschedule`` blocks). Durations are Go durations like 30s, 5m, 1h."""

    canary: Annotated[int, Field(ge=0, le=10)] = 1
    auto_revert: bool = True
    auto_promote: bool = True
    min_healthy_time: str = "30s"
    healthy_deadline: str = "15m"  # model loading takes minutes on big models
    progress_deadline: str = "30m"
    restart_attempts: Annotated[int, Field(ge=0)] = 3
    restart_interval: str = "30m"
    restart_delay: str = "30s"
    reschedule_delay: str = "1m"
    reschedule_max_delay: str = "30m"
    check_interval: str = "10s"
    check_timeout: str = "3s"


GPU_MEMORY_RE = r"^[0-9]+ (MiB|GiB)$"


class NomadJob(Model):
    """One inference service run as a Nomad job: what the service config does not say
    (the service itself, its model, runtime, port, GPUs and API key come from
    ``inference.services.<name>``, the same entry the systemd unit is made from)."""

    count: Annotated[int, Field(ge=1, le=100)] = 1  # allocations (replicas)
    cpu: Annotated[int, Field(ge=100)] = 4000  # MHz reserved
    memory_mb: Annotated[int, Field(ge=256)] = 32768  # RAM reserved (the model is mapped in)
    disk_mb: Annotated[int, Field(ge=300)] = 100_000  # ephemeral disk: the model lands there
    # Device constraints (the plugin fingerprints memory in MiB and the model name)
    gpu_memory_min: Annotated[str, StringConstraints(pattern=GPU_MEMORY_RE)] | None = None
    gpu_model: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9 ._-]+$")] | None = None
    # Container image; default nomad.images.<runtime>. Pinned by digest.
    image: Image | None = None


class Nomad(Model):
    """Nomad client settings and the inference services it runs as jobs."""

    enabled: bool = False  # install and run the Nomad client on this node
    version: Version = "1.10.5"  # pinned: package nomad=<version>-1 (apt) / nomad-<version> (dnf)
    # Base URL of a mirror of HashiCorp's apt/dnf repository; None: HashiCorp's own
    repo_url: HttpUrl | None = None
    datacenter: Name = "dc1"
    region: Name = "global"
    node_pool: Name = "default"
    servers: list[ServerAddr] = Field(default_factory=list)  # RPC addresses, host:4647
    data_dir: AbsPath = "/opt/nomad/data"
    config_dir: AbsPath = "/etc/nomad.d"
    bind_addr: str = "0.0.0.0"  # noqa: S104 - the firewall role limits who reaches it
    serf: bool = False  # also open Serf 4648 (servers only; clients need not be reachable)
    tls: NomadTls = Field(default_factory=NomadTls)
    device_plugin: DevicePlugin = Field(default_factory=DevicePlugin)
    # The HTTP API the controller submits jobs to (a server, or this client's API)
    address: HttpUrl | None = None
    namespace: Name = "default"
    # Controller-side TLS files for the API (CA to verify the server; client cert/key)
    api_ca_file: str | None = None
    api_cert_file: str | None = None
    api_key_file: str | None = None
    acl_token_vault: AclTokenVault = Field(default_factory=AclTokenVault)
    # Vault the client agent logs workloads in to (JWT auth with their workload identity)
    vault_address: HttpUrl | None = None
    vault_jwt_auth_path: Name = "jwt-nomad"
    # Vault role for the jobs' workload identity (Nomad >= 1.10: no Vault tokens)
    vault_role: Name = "gpunode-inference"
    vault_kv_mount: Name = "secret"  # KV v2 mount the jobs' templates read from
    # Inference services run as Nomad jobs (by name in inference.services), with their
    # Nomad-only settings; a service listed here is not also a systemd unit.
    jobs: dict[Name, NomadJob] = Field(default_factory=dict)
    # Container image per runtime (docker driver + NVIDIA container toolkit), pinned by digest,
    # e.g. vllm: docker.io/vllm/vllm-openai@sha256:<64 hex>
    images: dict[str, Image] = Field(default_factory=dict)
    policy: JobPolicy = Field(default_factory=JobPolicy)
