"""``vault:`` and ``secrets:``: how the controller reaches Vault, and each secret's place
in Vault and on the node (roles/secrets.py). The client is gpunode/clients/vault.py.

Credentials never live in the inventory: ``role_id`` may (it names the role, it
does not log in alone), the ``secret_id`` comes from the environment, a
root-only file or a response-wrapped token, and a token from ``$VAULT_TOKEN``
only when ``auth: token``.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator

from gpunode.schema.types import (
    AbsPath,
    EnvName,
    HttpUrl,
    KvPath,
    Model,
    RoleId,
    SecretKey,
    SecretMode,
    UnitName,
    UserName,
    VaultNamespace,
    system_group,
    system_user,
)

SECRETS_DIR = "/etc/gpunode/secrets"  # node path: <SECRETS_DIR>/<secret name>.env


# --- URLs the controller sends a credential to (vault.addr, nomad.address) -----------------

LOOPBACK_NAMES = frozenset({"localhost"})


def is_loopback(url: str) -> bool:
    """The URL's host is a loopback address (127.0.0.0/8, ::1) or ``localhost``."""
    host = urlsplit(url).hostname or ""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def credential_url(url: str | None, insecure_http: bool, flag: str) -> str | None:
    """The rules for a URL that gets a credential: a host, a valid port, no ``user:pw@``,
    and ``https://`` unless the host is loopback or ``flag`` (the insecure flag) is set.
    The URL is never echoed in an error: it may hold a password."""
    if url is None:
        return url
    parts = urlsplit(url)
    shown = f"{parts.scheme}://{parts.hostname or ''}"
    if "@" in parts.netloc:
        raise ValueError(
            f"{shown}...: the URL holds user info before '@' (allowed: scheme://host[:port] "
            "with no user:password@; credentials come from the environment or root-only files)"
        )
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{shown}...: bad port (allowed: a port from 1 to 65535)") from None
    if not parts.hostname or port == 0:
        raise ValueError(f"{shown}...: no host or port 0 (allowed: scheme://host[:port])")
    if parts.scheme == "http" and not insecure_http and not is_loopback(url):
        raise ValueError(
            f"{url!r} is plain http to a host that is not loopback: credentials would cross "
            "the network unencrypted (allowed: https://, http:// to 127.0.0.1, ::1 or "
            f"localhost, or {flag}: true beside it for a lab, warned about on every run)"
        )
    return url


class Vault(Model):
    """How the controller reaches Vault. Every default is here."""

    insecure_http: bool = False
    """Allow an `http://` `addr` that is not a loopback address: the secret_id, the token
    and every secret then cross the network unencrypted. Set it in the same inventory
    layer as `addr`; every run warns while it is true."""
    addr: HttpUrl | None = None
    """The Vault/OpenBao URL; required as soon as secrets are declared. `https://`, or
    `http://` only to a loopback address (127.0.0.0/8, ::1, localhost) or with
    `insecure_http`; no `user:password@`. The client follows a redirect only within this
    origin (scheme, host, port): one to anywhere else is an error."""
    auth: Literal["approle", "token"] = "approle"
    """How the controller logs in: AppRole, or a token taken from `$<token_env>` only."""
    approle_mount: KvPath = "approle"
    """The path the AppRole auth method is mounted at."""
    role_id: RoleId | None = None
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
    it must be a root-only regular file (owner root, mode 0600 or 0400; not a symbolic link)."""
    token_env: EnvName = "VAULT_TOKEN"  # noqa: S105 - a variable name
    """The environment variable holding the token with `auth: token`."""
    namespace: VaultNamespace | None = None
    """The Vault Enterprise / OpenBao namespace."""
    ca_cert: AbsPath | None = None
    """The CA bundle for the server's certificate."""
    tls_verify: bool = True
    """Verify the server's certificate: false only for a lab, never in production (every
    run warns while it is false)."""
    client_cert: AbsPath | None = None
    """The TLS client certificate (PEM) if Vault asks for one; without `client_key`, this
    file holds the private key too and must be root-only (mode 0600 or 0400)."""
    client_key: AbsPath | None = None
    """The TLS client certificate's private key (PEM), a root-only file (mode 0600 or
    0400); only with `client_cert`."""
    timeout: Annotated[float, Field(gt=0, le=300)] = 10.0
    """Seconds per request."""
    retries: Annotated[int, Field(ge=0, le=10)] = 3
    """Retries on connection errors and 5xx (sealed)."""
    backoff: Annotated[float, Field(ge=0, le=30)] = 0.5
    """Seconds before the first retry, doubled after each retry."""
    rotate_secret_id: bool = False
    """For the controller (docs/controller.md): every `gpunode drift` run logs in with the
    secret_id in `secret_id_file`, writes a new one of the same AppRole role there and
    destroys the old one, so a copied secret_id works until the next run at most, and the
    role's `secret_id_ttl` (a few schedule intervals) ends it when runs stop. Needs
    `auth: approle`, `secret_id_file` and the policy in docs/controller.md."""

    @field_validator("addr")
    @classmethod
    def _transport(cls, value: str | None, info: ValidationInfo) -> str | None:
        return credential_url(value, info.data.get("insecure_http", False), "vault.insecure_http")

    def warnings(self) -> list[str]:
        """What every run prints about this config's transport (see gpunode/inventory.py)."""
        found = []
        if self.insecure_http:
            found.append(
                f"vault.insecure_http is true: the secret_id, the Vault token and every secret "
                f"may cross the network unencrypted (vault.addr {self.addr})"
            )
        if not self.tls_verify:
            found.append(
                f"vault.tls_verify is false: Vault's certificate is not checked, anyone on the "
                f"path to {self.addr} can read the secret_id, the token and every secret"
            )
        return found


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
    key: SecretKey | None = None
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

    @field_validator("owner")
    @classmethod
    def _owner(cls, value: str) -> str:
        if value != "root" and system_user(value):
            raise ValueError(
                f"{value!r} is a system account (gpunode/schema/types.py SYSTEM_USERS): every "
                "process that runs as it could read the secret (allowed: root, or the user of "
                "the service that reads it)"
            )
        return value

    @field_validator("group")
    @classmethod
    def _group(cls, value: str) -> str:
        if value != "root" and system_group(value):
            raise ValueError(
                f"{value!r} is a system group (gpunode/schema/types.py SYSTEM_GROUPS): its "
                "members could read the secret (allowed: root, or the group of the service "
                "that reads it, e.g. gpunode-chat)"
            )
        return value

    def env_name(self) -> str:
        return self.env or re.sub(r"[^A-Za-z0-9_]", "_", self.key or "").upper()

    def dest_for(self, name: str) -> str:
        return self.dest or f"{SECRETS_DIR}/{name}.env"

    def where(self) -> str:
        return f"{self.mount}/{self.path}#{self.key}"
