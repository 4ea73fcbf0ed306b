"""The controller-side Vault client (hvac): log in, read secrets, revoke the token at exit.

The ``vault:`` and ``secrets:`` sections are in gpunode/schema/vault.py.

The controller reads secrets from Vault (or OpenBao) while the deploy file runs,
before any operation for the host is added; the values travel only inside
:func:`gpunode.operations.files.secret_file`. Any Vault problem (unreachable, sealed,
permission denied, path or key missing) raises :class:`VaultError` naming the
secret, and the run stops before anything is written.

.. code:: yaml

    defaults:
      vault:
        addr: https://vault.example.com:8200
        role_id: 4f7c...            # or $VAULT_ROLE_ID
        secret_id_file: /root/.gpunode/secret_id   # or $VAULT_SECRET_ID / $VAULT_WRAPPED_SECRET_ID
        ca_cert: /etc/ssl/certs/vault-ca.pem
      secrets:
        llm_api_key:
          path: gpunode/llm          # KV v2 path (no data/)
          key: api_key
          group: llm
          restart: [{name: llm.service, health_url: "http://127.0.0.1:8080/health"}]

Credentials never live in the inventory: ``role_id`` may (it names the role, it
does not log in alone), the ``secret_id`` comes from the environment, a
root-only file or a response-wrapped token, and a token from ``$VAULT_TOKEN``
only when ``auth: token``.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pyinfra.api.exceptions import PyinfraError

from gpunode import seal
from gpunode.clients.redirects import MAX_REDIRECTS, CrossOriginRedirect, same_origin_hook
from gpunode.schema.vault import Secret, Vault

if TYPE_CHECKING:
    import hvac


class VaultError(PyinfraError):
    """Vault could not give a secret; the message names it and says what to do.

    A PyinfraError: raised while the deploy file runs, pyinfra stops the whole
    run with this message before it executes any operation on any host.
    """


@dataclass(frozen=True)
class SecretValue:
    """A secret read from Vault. ``repr`` and ``str`` never show the value."""

    name: str
    version: int
    value: str = field(repr=False)

    def __repr__(self) -> str:
        return f"SecretValue({self.name!r}, version={self.version}, value=*MASKED*)"

    __str__ = __repr__

    def env_line(self, env: str) -> str:
        """``NAME=value`` for a systemd EnvironmentFile (quoted when needed)."""
        if re.fullmatch(r"[A-Za-z0-9_./+=:@%,-]*", self.value):
            return f"{env}={self.value}\n"
        escaped = self.value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
        return f'{env}="{escaped}"\n'


T = TypeVar("T")


class Session:
    """One logged-in Vault client for one ``Vault`` config; :meth:`close` revokes the token."""

    def __init__(self, config: Vault, environ: dict[str, str] | None = None) -> None:
        self.config = config
        self.environ = dict(os.environ if environ is None else environ)
        self.client: hvac.Client | None = None
        # pyinfra runs the deploy file for all hosts at once (gevent greenlets; it patches
        # threading): one login per session, or a wrapped secret_id would be unwrapped twice.
        self._lock = threading.Lock()

    # -- plumbing
    def _new_client(self, token: str = "") -> hvac.Client:
        import hvac
        import requests

        cfg = self.config
        if not cfg.addr:  # hvac would otherwise take $VAULT_ADDR or http://localhost:8200
            raise VaultError("vault login: vault.addr is not set (allowed: the Vault URL)")
        verify: bool | str = cfg.ca_cert if (cfg.ca_cert and cfg.tls_verify) else cfg.tls_verify
        # client_cert alone: one PEM holding the certificate and its key (client_key without
        # client_cert is refused at load, gpunode/secrets.py); the key's file is root-only
        cert: str | tuple[str, str] | None = None
        if cfg.client_cert:
            setting = "vault.client_key" if cfg.client_key else "vault.client_cert"
            with _open_root_only(cfg.client_key or cfg.client_cert, setting):
                pass
            cert = (cfg.client_cert, cfg.client_key) if cfg.client_key else cfg.client_cert
        # The transport: redirects only within vault.addr's origin (gpunode/clients/redirects.py).
        # hvac takes a given session's own verify and cert over its arguments: set them here.
        session = requests.Session()
        session.verify, session.cert = verify, cert
        session.max_redirects = MAX_REDIRECTS
        session.hooks["response"].append(same_origin_hook(cfg.addr))
        # token="" (never None): hvac would otherwise take $VAULT_TOKEN or ~/.vault-token.
        return hvac.Client(
            url=cfg.addr,
            token=token,
            verify=verify,
            cert=cert,
            timeout=cfg.timeout,
            namespace=cfg.namespace,
            session=session,
        )

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one request with retries and backoff on connection errors and 5xx answers."""
        import hvac.exceptions as hx
        import requests

        delay = self.config.backoff
        for attempt in range(self.config.retries + 1):
            try:
                return fn()
            except CrossOriginRedirect as exc:
                raise VaultError(
                    f"{what}: Vault at {exc} (allowed: redirects within "
                    f"{exc.start}; set vault.addr to the server that answers, e.g. the active "
                    "node or its load balancer)"
                ) from None
            except requests.TooManyRedirects:
                raise VaultError(
                    f"{what}: Vault at {self.config.addr} redirected more than {MAX_REDIRECTS} "
                    "times (allowed: an answer, or a redirect within its origin)"
                ) from None
            except requests.exceptions.SSLError:
                raise VaultError(
                    f"{what}: TLS verification of {self.config.addr} failed (allowed: "
                    "vault.ca_cert naming the CA that signed Vault's certificate)"
                ) from None
            except (requests.ConnectionError, requests.Timeout) as exc:
                reason = f"Vault at {self.config.addr} is unreachable ({type(exc).__name__})"
            except hx.VaultDown:
                reason = f"Vault at {self.config.addr} is sealed or down (503)"
            except (hx.InternalServerError, hx.BadGateway) as exc:
                reason = f"Vault at {self.config.addr} answered {type(exc).__name__}"
            except hx.Forbidden:
                raise VaultError(
                    f"{what}: permission denied by Vault (allowed: a policy on this login that "
                    "grants the capability on the path, see docs/secrets.md)"
                ) from None
            except hx.InvalidPath:
                raise VaultError(f"{what}: not found in Vault") from None
            except hx.InvalidRequest as exc:
                raise VaultError(f"{what}: Vault refused the request: {_errors(exc)}") from None
            except hx.VaultError as exc:
                raise VaultError(f"{what}: {type(exc).__name__}: {_errors(exc)}") from None
            if attempt < self.config.retries:
                time.sleep(delay)
                delay *= 2
        raise VaultError(f"{what}: {reason} after {self.config.retries + 1} attempt(s)")

    # -- login
    def login(self) -> hvac.Client:
        with self._lock:
            if self.client is None:
                self.client = self._login()
            return self.client

    def _login(self) -> hvac.Client:
        cfg = self.config
        if cfg.auth == "token":
            token = self.environ.get(cfg.token_env, "")
            if not token:
                raise VaultError(f"vault login: auth is token but ${cfg.token_env} is not set")
            client = self._new_client(token)
            self._call("vault login (token)", lambda: client.auth.token.lookup_self())
            return client
        role_id = self.environ.get(cfg.role_id_env) or cfg.role_id
        if not role_id:
            raise VaultError(
                f"vault login: no AppRole role_id (allowed: vault.role_id in the inventory "
                f"or ${cfg.role_id_env})"
            )
        secret_id = self._secret_id()
        client = self._new_client()
        self._call(
            f"vault login (AppRole {cfg.approle_mount})",
            lambda: client.auth.approle.login(
                role_id=role_id, secret_id=secret_id, mount_point=cfg.approle_mount
            ),
        )
        return client

    def _secret_id(self) -> str:
        cfg = self.config
        wrapped = self.environ.get(cfg.wrapped_secret_id_env)
        if wrapped:
            unwrapper = self._new_client(wrapped)  # the wrapping token is the client token
            try:
                resp = self._call(
                    f"vault login: unwrapping ${cfg.wrapped_secret_id_env}",
                    lambda: unwrapper.sys.unwrap(),
                )
            except VaultError as exc:
                raise VaultError(
                    f"{exc} (a wrapping token works once: it was already used, expired or "
                    "is not a wrapping token; ask for a new wrapped secret_id)"
                ) from None
            secret_id = (resp.get("data") or {}).get("secret_id")
            if not secret_id:
                raise VaultError(
                    f"vault login: ${cfg.wrapped_secret_id_env} did not wrap a secret_id "
                    "(allowed: the token from `write -wrap-ttl=... auth/approle/role/R/secret-id`)"
                )
            return str(secret_id)
        secret_id = self.environ.get(cfg.secret_id_env)
        if secret_id:
            return secret_id
        if cfg.secret_id_file:
            return read_root_only(cfg.secret_id_file)
        raise VaultError(
            f"vault login: no AppRole secret_id (allowed: ${cfg.wrapped_secret_id_env}, "
            f"${cfg.secret_id_env} or vault.secret_id_file)"
        )

    # -- KV v2
    def read(self, name: str, secret: Secret, version: int | None = None) -> SecretValue:
        """The value of ``secret.key`` at ``version`` (default: pinned, else latest)."""
        version = version or secret.version
        what = f"secret {name} ({secret.where()}{f' version {version}' if version else ''})"
        try:
            client = self.login()
        except VaultError as exc:
            raise VaultError(f"{what}: {exc}") from None
        resp = self._read_version(client, what, secret, version)
        data = (resp.get("data") or {}).get("data") or {}
        meta = (resp.get("data") or {}).get("metadata") or {}
        if secret.key not in data:
            keys = ", ".join(sorted(data)) or "none"
            raise VaultError(f"{what}: key {secret.key!r} is missing (keys there: {keys})")
        value = data[secret.key]
        if not isinstance(value, str) or "\n" in value or "\0" in value:
            raise VaultError(
                f"{what}: the value is not a one-line string (allowed: one line of text)"
            )
        read = SecretValue(name=name, version=int(meta.get("version") or 0), value=value)
        # a deploy's seal (gpunode/seal.py) checks the versions of unpinned ones again
        seal.note_vault(secret.mount, secret.path or "", read.version, pinned=bool(version))
        return read

    def _read_version(
        self, client: hvac.Client, what: str, secret: Secret, version: int | None
    ) -> dict[str, Any]:
        """One version of a KV v2 secret (the latest for None); a deleted one is an error."""
        return self._call(
            what,
            lambda: client.secrets.kv.v2.read_secret_version(
                path=secret.path,
                version=version,
                mount_point=secret.mount,
                raise_on_deleted_version=True,
            ),
        )

    def metadata(self, name: str, secret: Secret) -> dict[str, Any]:
        client = self.login()
        resp = self._call(
            f"secret {name} ({secret.mount}/{secret.path}) metadata",
            lambda: client.secrets.kv.v2.read_secret_metadata(
                path=secret.path, mount_point=secret.mount
            ),
        )
        return dict(resp.get("data") or {})

    def write(self, name: str, secret: Secret, value: str, cas: int) -> int:
        """Write ``value`` under ``secret.key`` as a new version (check-and-set); its number."""
        client = self.login()
        what = f"secret {name} ({secret.where()})"
        data: dict[Any, Any] = {}  # cas 0: the first version, nothing to keep
        if cas:
            current = self._read_version(client, what, secret, cas)
            data = dict((current.get("data") or {}).get("data") or {})
        data[secret.key] = value  # the other keys of the secret stay as they are
        try:
            resp = self._call(
                f"{what} write (check-and-set on version {cas})",
                lambda: client.secrets.kv.v2.create_or_update_secret(
                    path=secret.path, secret=data, cas=cas, mount_point=secret.mount
                ),
            )
        except VaultError as exc:
            # Vault's own words for a stale cas (not this call's name, which says check-and-set)
            if "check-and-set parameter did not match" in str(exc):
                raise VaultError(
                    f"{what}: someone wrote a newer version than {cas} meanwhile "
                    "(check-and-set failed); run the rotation again"
                ) from None
            raise
        return int(resp["data"]["version"])

    def destroy(self, name: str, secret: Secret, versions: list[int]) -> None:
        client = self.login()
        self._call(
            f"secret {name} ({secret.mount}/{secret.path}) destroy versions {versions}",
            lambda: client.secrets.kv.v2.destroy_secret_versions(
                path=secret.path, versions=versions, mount_point=secret.mount
            ),
        )

    def close(self) -> None:
        """Revoke the token this session logged in with (AppRole); a given token is kept."""
        client, self.client = self.client, None
        if client is None or self.config.auth == "token":
            return
        try:
            client.auth.token.revoke_self()
        except Exception:  # noqa: BLE001,S110 - best effort at exit; the token TTL bounds it
            pass


def _errors(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if errors:
        return "; ".join(str(e) for e in errors)[:300]
    return str(exc).split(", on ")[0][:300]


CREDENTIAL_FILE_MAX = 65536  # bytes: a secret_id is a line; more is not one
SECRET_ID_RE = r"[\x21-\x7e]{1,512}"  # noqa: S105 - a pattern: a UUID, or a custom one


def read_root_only(path: str) -> str:
    """The secret_id in a credentials file that only root (or this user) can read: one line
    of printable ASCII, no spaces. The checks are of the file opened (fstat), not of a path
    that could change in between; a symbolic link as the file's last component is refused."""
    what = "vault.secret_id_file"
    with _open_root_only(path, what) as handle:
        raw = handle.read(CREDENTIAL_FILE_MAX + 1)
    if len(raw) > CREDENTIAL_FILE_MAX:
        raise VaultError(
            f"{what} {path}: larger than {CREDENTIAL_FILE_MAX} bytes (allowed: one secret_id)"
        )
    value = raw.decode("latin-1").strip()  # any byte decodes; only printable ASCII passes below
    if not value:
        raise VaultError(f"{what} {path}: the file is empty")
    if not re.fullmatch(SECRET_ID_RE, value):
        raise VaultError(
            f"{what} {path}: not one secret_id (allowed: one line of 1 to 512 printable ASCII "
            "characters, no spaces or control characters)"
        )
    return value


@contextlib.contextmanager
def _open_root_only(path: str, what: str) -> Iterator[Any]:
    """``path`` opened for reading once it is a regular file owned by root (or this user)
    with no group or other bits; ``what`` (the setting) and the path name it in errors."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise VaultError(f"{what} {path}: cannot read it ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(handle.fileno())
        if (
            not stat.S_ISREG(st.st_mode)
            or st.st_uid not in (0, os.geteuid())
            or stat.S_IMODE(st.st_mode) & 0o077
        ):
            raise VaultError(
                f"{what} {path}: owned by uid {st.st_uid} with mode "
                f"{stat.S_IMODE(st.st_mode):04o} (allowed: a regular file owned by root, mode "
                "0600 or 0400)"
            )
        yield handle


# One session per Vault config for the whole run, closed (token revoked) at exit.
_SESSIONS: dict[str, Session] = {}


def session_for(config: Vault) -> Session:
    return _SESSIONS.setdefault(config.model_dump_json(), Session(config))


def close_all() -> None:
    while _SESSIONS:
        _, session = _SESSIONS.popitem()
        session.close()


atexit.register(close_all)


# --- the controller's own secret_id, replaced by every drift run (docs/controller.md) -------
#
# ``vault.rotate_secret_id``: the drift run (gpunode/commands/drift.py) calls
# :func:`rotate_secret_id` before it plans anything. The order makes every crash safe:
#
# 1. log in with the secret_id in ``vault.secret_id_file`` (it stays valid meanwhile);
# 2. generate a new secret_id for the same role (the role's TTL and bound CIDRs apply);
#    a crash here leaves the old one on disk, still valid: the next run logs in with it,
#    and the lost new one dies at its TTL;
# 3. write the new one over the file atomically (a root-only temporary file in the same
#    directory, fsync, rename, fsync the directory); a crash before the rename leaves the
#    old file whole (the next run removes the temporary file);
# 4. destroy the old one (by value: idempotent, and no accessor to keep); a crash before
#    this leaves the old one valid until its TTL, never longer.
#
# A run that cannot log in stops with one clear error (a refused secret_id is not retried).

ROTATED_SUFFIX = ".gpunode-new"  # the temporary file: .<name>.gpunode-new beside the file
ROLE_NAME_RE = r"[A-Za-z0-9_.-]{1,128}"


@dataclass(frozen=True)
class Rotation:
    """One rotation's outcome; nothing in it logs in."""

    path: str
    role: str
    ttl: int  # seconds the new secret_id lives unless the next run replaces it (0: no TTL)


def rotate_secret_id(config: Vault, environ: dict[str, str] | None = None) -> Rotation:
    """Replace the AppRole secret_id in ``config.secret_id_file`` with a new one of the same
    role and destroy the old one (steps and crash safety above).

    .. code:: python

        rotation = rotate_secret_id(config.vault)   # before the run logs in for secrets
        rotation.ttl  # the role's secret_id_ttl
    """
    env = dict(os.environ if environ is None else environ)
    if config.auth != "approle" or not config.secret_id_file:
        raise VaultError(
            "vault.rotate_secret_id: needs vault.auth: approle and vault.secret_id_file "
            "(allowed: both set, or rotate_secret_id: false)"
        )
    for name in (config.wrapped_secret_id_env, config.secret_id_env):
        if env.get(name):
            raise VaultError(
                f"vault.rotate_secret_id: ${name} is set, so the run would log in with it "
                f"instead of {config.secret_id_file}, the file it rotates (allowed: unset it)"
            )
    path = Path(config.secret_id_file)
    with _directory_lock(path.parent):
        (path.parent / f".{path.name}{ROTATED_SUFFIX}").unlink(missing_ok=True)  # a crash's
        old = read_root_only(str(path))
        session = Session(config, environ=env)
        try:
            try:
                client = session.login()
            except VaultError as exc:
                if "refused" not in str(exc):  # unreachable, sealed: said as it is
                    raise
                raise VaultError(
                    f"{exc}: the controller's secret_id in {path} no longer logs in: it was "
                    "revoked, or it expired because no run replaced it within the role's "
                    "secret_id_ttl, or this host's address is outside the role's bound CIDRs "
                    "(allowed: a new secret_id of the role in that file, root-only; see "
                    "docs/controller.md)"
                ) from None
            meta = session._call(
                "vault: looking up this run's token", lambda: client.auth.token.lookup_self()
            )
            role = str(((meta.get("data") or {}).get("meta") or {}).get("role_name") or "")
            if not re.fullmatch(ROLE_NAME_RE, role):
                raise VaultError(
                    "vault.rotate_secret_id: Vault named no usable AppRole role for this login "
                    f"(got {role[:40]!r}; allowed: {ROLE_NAME_RE})"
                )
            resp = session._call(
                f"vault: a new secret_id for AppRole role {role}",
                lambda: client.auth.approle.generate_secret_id(
                    role, metadata={"issued_by": "gpunode drift"}, mount_point=config.approle_mount
                ),
            )
            data = resp.get("data") or {}
            new = data.get("secret_id")
            if not isinstance(new, str) or not re.fullmatch(r"[\x21-\x7e]{8,512}", new):
                raise VaultError(
                    f"vault: AppRole role {role} answered without a usable secret_id; the old "
                    f"one in {path} is kept"
                )
            write_root_only(path, new + "\n")
            session._call(
                f"vault: destroying the previous secret_id of AppRole role {role} (the new one "
                f"is already in {path}; the old one stays valid until its TTL)",
                lambda: client.auth.approle.destroy_secret_id(
                    role, old, mount_point=config.approle_mount
                ),
            )
            return Rotation(path=str(path), role=role, ttl=int(data.get("secret_id_ttl") or 0))
        finally:
            session.close()  # revoke this login's token; the run logs in with the new one


def write_root_only(path: str | Path, text: str) -> None:
    """Replace ``path`` atomically with a file only its owner can read (0600, created so;
    content fsynced before the rename, the directory after it)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}{ROTATED_SUFFIX}"
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """An exclusive lock on the directory itself (no lock file): two runs never rotate at once."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise VaultError(f"vault.secret_id_file: {directory}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            # said, not left to the close: gevent's os.close (the CLI runs monkey-patched)
            # defers closing a directory's descriptor to its event loop, and the next
            # rotation in this process would wait for the lock forever
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
