"""``vault:`` and ``secrets:``: how the controller reaches Vault, and each secret's place
in Vault and on the node (roles/secrets.py). The client is gpunode/clients/vault.py.

Credentials never live in the inventory: ``role_id`` may (it names the role, it
does not log in alone), the ``secret_id`` comes from the environment, a
root-only file or a response-wrapped token, and a token from ``$VAULT_TOKEN``
only when ``auth: token``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, StringConstraints

from gpunode.schema.types import (
    AbsPath,
    EnvName,
    HttpUrl,
    KvPath,
    Model,
    SecretMode,
    UnitName,
    UserName,
)

SECRETS_DIR = "/etc/gpunode/secrets"  # node path: <SECRETS_DIR>/<secret name>.env


class Vault(Model):
    """How the controller reaches Vault. Every default is here."""

    addr: HttpUrl | None = None  # Vault/OpenBao URL; required as soon as secrets are declared
    auth: Literal["approle", "token"] = "approle"  # token: taken from $<token_env> only
    approle_mount: KvPath = "approle"
    role_id: str | None = None  # AppRole role_id; $<role_id_env> wins when set
    role_id_env: EnvName = "VAULT_ROLE_ID"
    # secret_id, first found wins: $<wrapped_secret_id_env> (a response-wrapping token,
    # unwrapped once), $<secret_id_env>, then secret_id_file (root-only: owner root, 0600/0400).
    wrapped_secret_id_env: EnvName = "VAULT_WRAPPED_SECRET_ID"  # noqa: S105 - a variable name
    secret_id_env: EnvName = "VAULT_SECRET_ID"  # noqa: S105 - a variable name
    secret_id_file: AbsPath | None = None
    token_env: EnvName = "VAULT_TOKEN"  # noqa: S105 - a variable name
    namespace: str | None = None  # Vault Enterprise / OpenBao namespace
    ca_cert: AbsPath | None = None  # CA bundle for the server's certificate
    tls_verify: bool = True  # false only for a lab; never in production
    client_cert: AbsPath | None = None  # TLS client certificate (and key) if Vault asks for one
    client_key: AbsPath | None = None
    timeout: Annotated[float, Field(gt=0, le=300)] = 10.0  # seconds per request
    retries: Annotated[int, Field(ge=0, le=10)] = 3  # on connection errors and 5xx (sealed)
    backoff: Annotated[float, Field(ge=0, le=30)] = 0.5  # seconds, doubled after each retry


class Service(Model):
    """A systemd unit restarted when the secret file changes, and how to tell it is healthy."""

    name: UnitName
    health_url: HttpUrl | None = None  # fetched on the node with curl; 2xx = healthy


def _service(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class Secret(Model):
    """One secret: where it comes from in Vault and where it goes on the node."""

    mount: KvPath = "secret"  # the KV v2 mount
    # Both required on the merged config (check_host), so a group or host may override
    # a single field (a pinned version, say) without repeating them.
    path: KvPath | None = None  # path in the mount, without data/ (e.g. gpunode/llm)
    key: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]+$")] | None = None
    version: Annotated[int, Field(ge=1)] | None = None  # pin a version; default: the latest
    env: EnvName | None = None  # variable name in the env file; default: KEY upper-cased
    dest: AbsPath | None = None  # default: /etc/gpunode/secrets/<name>.env
    owner: UserName = "root"
    group: UserName = "root"
    mode: SecretMode = "0640"  # never readable by others (last digit 0)
    restart: list[Annotated[Service, BeforeValidator(_service)]] = Field(default_factory=list)
    health_timeout: Annotated[float, Field(gt=0, le=600)] = 60.0  # seconds, per host in rotation
    rollback: bool = True  # rotation: put a host whose health check fails back on the old version

    def env_name(self) -> str:
        return self.env or re.sub(r"[^A-Za-z0-9_]", "_", self.key or "").upper()

    def dest_for(self, name: str) -> str:
        return self.dest or f"{SECRETS_DIR}/{name}.env"

    def where(self) -> str:
        return f"{self.mount}/{self.path}#{self.key}"
