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

    addr: HttpUrl | None = None
    """The Vault/OpenBao URL; required as soon as secrets are declared."""
    auth: Literal["approle", "token"] = "approle"
    """How the controller logs in: AppRole, or a token taken from `$<token_env>` only."""
    approle_mount: KvPath = "approle"
    """The path the AppRole auth method is mounted at."""
    role_id: str | None = None
    """The AppRole role_id (it names the role, it does not log in alone); `$<role_id_env>`
    wins when set."""
    role_id_env: EnvName = "VAULT_ROLE_ID"
    """The environment variable whose value, when set, is the role_id."""
    wrapped_secret_id_env: EnvName = "VAULT_WRAPPED_SECRET_ID"  # noqa: S105 - a variable name
    """The environment variable holding a response-wrapping token for the secret_id
    (unwrapped once). The secret_id is the first found of: `$<wrapped_secret_id_env>`,
    `$<secret_id_env>`, then `secret_id_file`."""
    secret_id_env: EnvName = "VAULT_SECRET_ID"  # noqa: S105 - a variable name
    """The environment variable holding the secret_id; used when `$<wrapped_secret_id_env>`
    is not set."""
    secret_id_file: AbsPath | None = None
    """A file on the controller holding the secret_id, used when neither variable is set;
    it must be root-only (owner root, mode 0600 or 0400)."""
    token_env: EnvName = "VAULT_TOKEN"  # noqa: S105 - a variable name
    """The environment variable holding the token with `auth: token`."""
    namespace: str | None = None
    """The Vault Enterprise / OpenBao namespace."""
    ca_cert: AbsPath | None = None
    """The CA bundle for the server's certificate."""
    tls_verify: bool = True
    """Verify the server's certificate: false only for a lab; never in production."""
    client_cert: AbsPath | None = None
    """TLS client certificate (and key) if Vault asks for one."""
    client_key: AbsPath | None = None
    """The TLS client certificate's private key; only with `client_cert`."""
    timeout: Annotated[float, Field(gt=0, le=300)] = 10.0
    """Seconds per request."""
    retries: Annotated[int, Field(ge=0, le=10)] = 3
    """Retries on connection errors and 5xx (sealed)."""
    backoff: Annotated[float, Field(ge=0, le=30)] = 0.5
    """Seconds before the first retry, doubled after each retry."""


class Service(Model):
    """A systemd unit restarted when the secret file changes, and how to tell it is healthy."""

    name: UnitName
    """The systemd unit, e.g. gpunode-inference-chat.service."""
    health_url: HttpUrl | None = None
    """Fetched on the node with curl (by `gpunode rotate`); 2xx = healthy."""


def _service(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class Secret(Model):
    """One secret: where it comes from in Vault and where it goes on the node."""

    mount: KvPath = "secret"
    """The KV v2 mount."""
    path: KvPath | None = None
    """The path in the mount, without data/ (e.g. gpunode/llm). Required on the merged config
    (checked at config load), so a group or host may override a single field (a pinned
    version, say) without repeating it."""
    key: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]+$")] | None = None
    """The key inside the secret (e.g. api_key). Required on the merged config, like
    `path`."""
    version: Annotated[int, Field(ge=1)] | None = None
    """Pin a version; default: the latest."""
    env: EnvName | None = None
    """The variable name in the env file; default: `key` upper-cased (other characters
    than letters, digits and '_' become '_')."""
    dest: AbsPath | None = None
    """The file on the node, one per secret; default: `/etc/gpunode/secrets/<name>.env`."""
    owner: UserName = "root"
    """The file's owner."""
    group: UserName = "root"
    """The file's group (created as a system group when it is not root)."""
    mode: SecretMode = "0640"
    """The file's mode: never readable by others (last digit 0)."""
    restart: list[Annotated[Service, BeforeValidator(_service)]] = Field(default_factory=list)
    """The units to restart: each a unit name, or a mapping with its `name` and
    `health_url`."""
    health_timeout: Annotated[float, Field(gt=0, le=600)] = 60.0
    """`gpunode rotate`: seconds, per host, for the `restart` services to be active and
    healthy."""
    rollback: bool = True
    """`gpunode rotate`: put a host whose health check fails back on the old version."""

    def env_name(self) -> str:
        return self.env or re.sub(r"[^A-Za-z0-9_]", "_", self.key or "").upper()

    def dest_for(self, name: str) -> str:
        return self.dest or f"{SECRETS_DIR}/{name}.env"

    def where(self) -> str:
        return f"{self.mount}/{self.path}#{self.key}"
