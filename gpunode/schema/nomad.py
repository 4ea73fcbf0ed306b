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

from pydantic import Field, ValidationInfo, field_validator

from gpunode.schema.nvidia import repository_url
from gpunode.schema.runtimes import RuntimeName
from gpunode.schema.types import (
    AbsPath,
    Duration,
    GpuId,
    GpuMemory,
    GpuName,
    HttpUrl,
    Image,
    IpAddress,
    KvPath,
    Model,
    Name,
    Period,
    SecretKey,
    ServerAddr,
    Sha256,
    Uri,
    Version,
)
from gpunode.schema.vault import credential_url

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
    """Mutual TLS for HTTP and RPC (the `tls` block); false: no `tls` block."""
    ca_file: AbsPath = "/etc/nomad.d/tls/ca.pem"
    """The CA certificate on the node."""
    cert_file: AbsPath = "/etc/nomad.d/tls/client.pem"
    """The client agent's certificate on the node."""
    key_file: AbsPath = "/etc/nomad.d/tls/client-key.pem"
    """The client agent's private key on the node (placed through gpunode's secrets role)."""
    verify_server_hostname: bool = True
    """The server cert must be `server.<region>.nomad`."""
    verify_https_client: bool = True
    """HTTP API callers need a client certificate."""


class AclTokenVault(Model):
    """Where the controller reads the Nomad ACL token (Vault KV v2) used to submit jobs."""

    mount: Name = "secret"
    """The KV v2 mount."""
    path: KvPath = "gpunode/nomad"
    """The path in the mount, without data/."""
    key: SecretKey = "token"
    """The key inside the secret that holds the token's SecretID."""


class DevicePlugin(Model):
    """nomad-device-nvidia: HashiCorp's NVIDIA device plugin (a release zip)."""

    enabled: bool = True
    """Install the plugin and load it in the client (`plugin "nomad-device-nvidia"`)."""
    version: Version = "1.1.0"
    """The plugin's release version."""
    url: HttpUrl | None = None
    """The release zip (or a mirror of it); null: HashiCorp's release URL."""
    sha256: Sha256 | None = None
    """The sha256 of the release zip; required when enabled (checked at config load)."""
    fingerprint_period: Period = "1m"
    """How often the plugin fingerprints the GPUs (the plugin's `fingerprint_period`)."""
    ignored_gpu_ids: list[GpuId] = Field(default_factory=list)
    """GPU UUIDs the plugin does not offer to Nomad (the plugin's `ignored_gpu_ids`)."""

    def release_url(self) -> str:
        return self.url or (
            f"https://releases.hashicorp.com/nomad-device-nvidia/{self.version}/"
            f"nomad-device-nvidia_{self.version}_linux_amd64.zip"
        )


class JobPolicy(Model):
    """Scheduling policy of every rendered job (Nomad ``update``, ``restart``,
    ``reschedule`` blocks). Durations are Go durations like 30s, 5m, 1h."""

    canary: Annotated[int, Field(ge=0, le=10)] = 1
    """`update.canary`: canary allocations placed for a new job version; 0: none (and no
    auto-promotion)."""
    auto_revert: bool = True
    """`update.auto_revert`: a failed deployment rolls back to the last stable version."""
    auto_promote: bool = True
    """`update.auto_promote`: healthy canaries are promoted without an operator."""
    min_healthy_time: Duration = "30s"
    """`update.min_healthy_time`: how long an allocation must be healthy to count as
    healthy."""
    healthy_deadline: Duration = "15m"
    """`update.healthy_deadline`: model loading takes minutes on big models. It must be
    longer than each job's service `health_timeout` (checked at config load)."""
    progress_deadline: Duration = "30m"
    """`update.progress_deadline`: a deployment fails when no allocation becomes healthy
    within it."""
    restart_attempts: Annotated[int, Field(ge=0)] = 3
    """`restart.attempts`: restarts within `restart_interval` before the allocation
    fails."""
    restart_interval: Duration = "30m"
    """`restart.interval`."""
    restart_delay: Duration = "30s"
    """`restart.delay`: the wait before a restart."""
    reschedule_delay: Duration = "1m"
    """`reschedule.delay`: the first wait before a failed allocation is rescheduled
    (exponential)."""
    reschedule_max_delay: Duration = "30m"
    """`reschedule.max_delay`: the longest wait between reschedules."""
    check_interval: Duration = "10s"
    """How often the health check asks the runtime's health endpoint."""
    check_timeout: Duration = "3s"
    """The health check's timeout."""


class NomadJob(Model):
    """One inference service run as a Nomad job: what the service config does not say
    (the service itself, its model, runtime, port, GPUs and API key come from
    ``inference.services.<name>``, the same entry the systemd unit is made from)."""

    count: Annotated[int, Field(ge=1, le=100)] = 1
    """Allocations (replicas)."""
    cpu: Annotated[int, Field(ge=100)] = 4000
    """MHz reserved."""
    memory_mb: Annotated[int, Field(ge=256)] = 32768
    """RAM reserved, in MB (the model is mapped in)."""
    disk_mb: Annotated[int, Field(ge=300)] = 100_000
    """Ephemeral disk, in MB: the model lands there."""
    gpu_memory_min: GpuMemory | None = None
    """Device constraint: memory per GPU at least this, e.g. "16 GiB" (the plugin
    fingerprints memory in MiB). Only for a service with GPUs."""
    gpu_model: GpuName | None = None
    """Device constraint: the GPU model name the plugin fingerprints. Only for a service with
    GPUs."""
    image: Image | None = None
    """Container image; default `nomad.images.<runtime>`. Pinned by digest."""


class Nomad(Model):
    """Nomad client settings and the inference services it runs as jobs."""

    enabled: bool = False
    """Install and run the Nomad client on this node."""
    version: Version = "1.10.5"
    """Pinned: package `nomad=<version>-1` (apt) / `nomad-<version>` (dnf)."""
    repo_url_allow_http: bool = False
    """Accept an `http://` `repo_url`; every run warns while one is used. Packages are still
    checked against HashiCorp's pinned signing key."""
    repo_url: HttpUrl | Uri | None = None
    """Base URL of a mirror of HashiCorp's apt/dnf repository; null: HashiCorp's own.
    `https://` or `file:///`; `http://` only with `repo_url_allow_http`. Its signing key
    (`<repo_url>/gpg`) is checked against the fingerprint pinned in gpunode/nomad.py."""
    datacenter: Name = "dc1"
    """The client's datacenter (also the jobs' datacenter)."""
    region: Name = "global"
    """The client's region (also the jobs' region)."""
    node_pool: Name = "default"
    """The client's node pool."""
    servers: list[ServerAddr] = Field(default_factory=list)
    """The servers' RPC addresses, host:4647; required when enabled."""
    data_dir: AbsPath = "/opt/nomad/data"
    """The agent's data directory (plugins go in its plugins/)."""
    config_dir: AbsPath = "/etc/nomad.d"
    """The agent's configuration directory (nomad.hcl)."""
    bind_addr: IpAddress = "0.0.0.0"  # noqa: S104 - the firewall role limits who reaches it
    """The address the agent binds to; the firewall role limits who reaches it."""
    serf: bool = False
    """Also open Serf 4648 (servers only; clients need not be reachable)."""
    tls: NomadTls = Field(default_factory=NomadTls)
    """The agent's TLS (Nomad `tls` block)."""
    device_plugin: DevicePlugin = Field(default_factory=DevicePlugin)
    """nomad-device-nvidia: HashiCorp's NVIDIA device plugin."""
    insecure_http: bool = False
    """Allow an `http://` `address` (or `$NOMAD_ADDR`) that is not a loopback address: the
    ACL token then crosses the network unencrypted. Set it in the same inventory layer as
    `address`; every run warns while it is true."""
    address: HttpUrl | None = None
    """The HTTP API the controller submits jobs to (a server, or this client's API);
    null: `$NOMAD_ADDR`. `https://`, or `http://` only to a loopback address (127.0.0.0/8,
    ::1, localhost) or with `insecure_http`; no `user:password@`. The client follows a
    redirect only within this origin (scheme, host, port): one to anywhere else is an
    error."""
    namespace: Name = "default"
    """The namespace the jobs are submitted to."""
    api_ca_file: AbsPath | None = None
    """Controller-side TLS file for the API: the CA to verify the server."""
    api_cert_file: AbsPath | None = None
    """Controller-side TLS file for the API: the controller's client certificate."""
    api_key_file: AbsPath | None = None
    """Controller-side TLS file for the API: the client certificate's key."""
    acl_token_vault: AclTokenVault = Field(default_factory=AclTokenVault)
    """`$NOMAD_TOKEN` overrides it."""
    vault_address: HttpUrl | None = None
    """Vault the client agent logs workloads in to (JWT auth with their workload identity);
    null: no `vault` block."""
    vault_jwt_auth_path: Name = "jwt-nomad"
    """The JWT auth mount in that Vault (`jwt_auth_backend_path`)."""
    vault_role: Name = "gpunode-inference"
    """Vault role for the jobs' workload identity (Nomad >= 1.10: no Vault tokens)."""
    vault_kv_mount: Name = "secret"
    """KV v2 mount the jobs' templates read from (a job's API key secret must be in it)."""
    jobs: dict[Name, NomadJob] = Field(default_factory=dict)
    """Inference services run as Nomad jobs (by name in inference.services), with their
    Nomad-only settings; a service listed here is not also a systemd unit. Needs
    `enabled`."""
    images: dict[RuntimeName, Image] = Field(default_factory=dict)
    """Container image per runtime (docker driver + NVIDIA container toolkit), pinned by
    digest, e.g. `vllm: docker.io/vllm/vllm-openai@sha256:<64 hex>`."""
    policy: JobPolicy = Field(default_factory=JobPolicy)
    """Scheduling policy of every rendered job."""

    @field_validator("repo_url")
    @classmethod
    def _repo_transport(cls, value: str | None, info: ValidationInfo) -> str | None:
        allow = info.data.get("repo_url_allow_http", False)
        return repository_url(value, allow, "nomad.repo_url_allow_http")

    @field_validator("address")
    @classmethod
    def _transport(cls, value: str | None, info: ValidationInfo) -> str | None:
        return credential_url(value, info.data.get("insecure_http", False), "nomad.insecure_http")

    def warnings(self) -> list[str]:
        """What every run prints about this config's transport (see gpunode/inventory.py)."""
        if not self.insecure_http:
            return []
        return [
            "nomad.insecure_http is true: the Nomad ACL token may cross the network "
            f"unencrypted (nomad.address {self.address or '$NOMAD_ADDR'})"
        ]
