"""`gpunode rotate`: a new secret version in Vault, rolled out host by host with health checks.

    gpunode rotate inventories/prod.py llm_api_key --generate [--batch 2] [--destroy-old]
    printf %s "$NEW" | gpunode rotate inventories/prod.py llm_api_key --value-from-stdin

1. Write the new value as a new KV v2 version with check-and-set on the current
   version (the other keys of the secret are kept; a concurrent writer makes it fail).
2. For each batch of hosts (``--batch N``, default 1) run deploys/rotate_secrets.py
   (the secrets role) for this secret at the new version, through gpunode.commands.run
   (gpunode's leak-proof file operation; dependent services restart when their file
   changed), then wait until every service in the secret's ``restart`` list is active
   and its ``health_url`` answers 2xx.
3. A host that fails (deploy or health) stops the rollout: it is reported, put back
   on the previous version when the secret's ``rollback`` is true (``--rollback`` /
   ``--no-rollback`` override), and no further host is touched. Exit status 1.
4. With ``--destroy-old`` and every host healthy, the previous version is destroyed.

The value is never printed; the report names hosts, versions and services.

A gateway client's key (the name ``gateway.clients.<client>``) is rotated the same way:

    gpunode rotate inventories/prod.py gateway.clients.alice --generate

The hosts are those whose gateway has the client, not revoked; the deploy is
deploys/rotate_gateway.py (the gateway role, that client's key at the new version; the
node gets its SHA-256 only). A host is healthy when haproxy.service is active, the
gateway's ``/health`` answers 200 over TLS on the node, the key's SHA-256 is in its keys
map, and, when the controller reaches the gateway's port, ``GET /v1/models`` with the new
key answers 200 to the controller over TLS verified against the PKI mount's CA. The key
is never on a command line, in a log or in the report: the node sees only its digest. A
client has no ``rollback`` setting: a failing host is put back unless ``--no-rollback``.
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import secrets as _random
import shlex
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyinfra.api import StringCommand

from gpunode import gateway as front
from gpunode.clients.pki import Issuer
from gpunode.clients.vault import Session, VaultError, session_for
from gpunode.commands import run
from gpunode.inventory import load_inventory_file
from gpunode.paths import REPO_ROOT
from gpunode.schema.gateway import HEALTH_ROUTE, ClientKey
from gpunode.schema.node import Host, NodeConfig, host_data
from gpunode.schema.types import ConfigError
from gpunode.schema.vault import Secret

# The secrets role alone, for one secret at one version (see the file).
ROTATE_DEPLOY = REPO_ROOT / "deploys" / "rotate_secrets.py"
# The gateway role alone, with one client's key at one version (see the file).
GATEWAY_DEPLOY = REPO_ROOT / "deploys" / "rotate_gateway.py"
CLIENT_PREFIX = "gateway.clients."  # the name of a client's key: gateway.clients.<client>
GATEWAY_HEALTH_TIMEOUT = 60.0  # seconds, per host (a client has no health_timeout)
REACH_TIMEOUT = 2.0  # seconds for the controller to connect to a gateway's port
REQUEST_TIMEOUT = 10.0  # seconds for the controller's GET /v1/models
MODELS_ROUTE = "/v1/models"
# A bearer key HAProxy can read: one word of printable ASCII (its word(2,' ') of the header).
KEY_RE = re.compile(r"[\x21-\x7e]+")

# pyinfra host, gpunode host -> the host's result
Check = Callable[[Any, Host], "HostResult"]


class RotateError(Exception):
    """Rotation refused or failed before any host was touched."""


@dataclass
class HostResult:
    host: str
    version: int
    ok: bool
    detail: str
    rolled_back_to: int | None = None


@dataclass
class Rotation:
    secret: str
    old_version: int
    new_version: int
    results: list[HostResult] = field(default_factory=list)
    destroyed: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)


def generate_value() -> str:
    """A new random value: 32 bytes, URL-safe base64 (43 characters)."""
    return _random.token_urlsafe(32)


def secret_hosts(hosts: list[Host], name: str) -> tuple[list[Host], Secret]:
    """The hosts that declare ``name`` and its one definition (refused when they differ)."""
    using = [h for h in hosts if name in h.config.secrets]
    if not using:
        declared = sorted({s for h in hosts for s in h.config.secrets}) or ["none"]
        raise RotateError(f"secret {name}: no host declares it (allowed: {', '.join(declared)})")
    first = using[0]
    secret = first.config.secrets[name]
    for h in using:
        other = h.config.secrets[name]
        if (other.mount, other.path, other.key) != (secret.mount, secret.path, secret.key):
            raise RotateError(
                f"secret {name}: host {h.name} reads {other.where()}, host {first.name} reads "
                f"{secret.where()} (allowed: one Vault source per secret name to rotate)"
            )
        if h.config.vault != first.config.vault:
            raise RotateError(
                f"secret {name}: host {h.name} has other vault settings than {first.name}"
            )
        if other.version is not None:
            raise RotateError(
                f"secret {name}: host {h.name} pins version {other.version} (allowed: remove "
                f"secrets.{name}.version to rotate)"
            )
    return using, secret


def client_hosts(hosts: list[Host], client: str) -> tuple[list[Host], ClientKey]:
    """The hosts whose gateway has ``client`` (not revoked) and its one key source (refused
    when they differ)."""
    where = f"{CLIENT_PREFIX}{client}"
    gated = [h for h in hosts if h.config.gateway.enabled]
    using = [h for h in gated if client in front.active_clients(h.config)]
    if not using:
        revoked = [h.name for h in gated if client in h.config.gateway.clients]
        if revoked:
            raise RotateError(
                f"{where}: revoked on every host that has it ({', '.join(revoked)}): a revoked "
                "key is not rolled out (allowed: a client that is not revoked)"
            )
        existing = sorted({c for h in gated for c in front.active_clients(h.config)})
        raise RotateError(
            f"{where}: no host's gateway has this client (allowed: "
            f"{', '.join(CLIENT_PREFIX + c for c in existing) or 'none: no gateway has a client'})"
        )
    first = using[0]
    key = first.config.gateway.clients[client].key
    for h in using:
        other = h.config.gateway.clients[client].key
        if (other.mount, other.path, other.key) != (key.mount, key.path, key.key):
            raise RotateError(
                f"{where}: host {h.name} reads {other.where()}, host {first.name} reads "
                f"{key.where()} (allowed: one Vault source per client to rotate)"
            )
        if h.config.vault != first.config.vault:
            raise RotateError(f"{where}: host {h.name} has other vault settings than {first.name}")
    return using, key


def rotate(
    hosts: list[Host],
    name: str,
    value: str,
    batch: int = 1,
    rollback: bool | None = None,
    destroy_old: bool = False,
    say: Callable[[str], None] = print,
    session: Session | None = None,
) -> Rotation:
    """Rotate the secret ``name`` (under ``secrets:``), or a gateway client's key
    (``gateway.clients.<client>``), to ``value``: see the module docstring."""
    if batch < 1:
        raise RotateError(f"--batch {batch}: allowed: 1 or more")
    if name.startswith(CLIENT_PREFIX):
        client = name.removeprefix(CLIENT_PREFIX)
        return _rotate_client(hosts, client, value, batch, rollback, destroy_old, say, session)
    if not value or "\n" in value:
        raise RotateError(f"secret {name}: the new value must be one non-empty line")
    using, secret = secret_hosts(hosts, name)
    rollback = secret.rollback if rollback is None else rollback
    session = session or session_for(using[0].config.vault)

    def roll(group: list[Host], version: int) -> list[HostResult]:
        data = {"gpunode_secret": name, "gpunode_secret_version": version}
        return _roll_out(
            group,
            ROTATE_DEPLOY,
            data,
            version,
            lambda host, _: _wait_healthy(host, secret, version),
        )

    return _rotate(
        _Target(f"secret {name}", name, secret, using, rollback, roll, "the service"),
        value,
        batch,
        destroy_old,
        say,
        session,
    )


def _rotate_client(
    hosts: list[Host],
    client: str,
    value: str,
    batch: int,
    rollback: bool | None,
    destroy_old: bool,
    say: Callable[[str], None],
    session: Session | None,
) -> Rotation:
    label = f"{CLIENT_PREFIX}{client}"
    if not KEY_RE.fullmatch(value or ""):
        raise RotateError(
            f"{label}: the new key must be one word of printable ASCII, without spaces or "
            "control characters (allowed: e.g. what --generate makes)"
        )
    using, key = client_hosts(hosts, client)
    secret = Secret(mount=key.mount, path=key.path, key=key.key)
    name = f"{label}.key"  # what the gateway role calls it in Vault errors
    session = session or session_for(using[0].config.vault)
    _refuse_a_shared_key(using, client, value, session)
    # The CA each gateway's certificate comes from: read before anything is written.
    cas: dict[tuple[str, str], str] = {}
    for h in using:
        tls = h.config.gateway.tls
        if (tls.mount, tls.role) not in cas:
            cas[(tls.mount, tls.role)] = Issuer(session, tls.mount, tls.role).ca_pem()

    def roll(group: list[Host], version: int) -> list[HostResult]:
        # the key of this version, for its digest and the controller's request (from Vault,
        # like the deploy reads it)
        key_value = session.read(name, secret, version=version).value
        data = {"gpunode_gateway_client": client, "gpunode_gateway_client_version": version}

        def check(host: Any, node: Host) -> HostResult:
            tls = node.config.gateway.tls
            ca = cas[(tls.mount, tls.role)]
            return _gateway_healthy(host, node, client, key_value, version, ca)

        return _roll_out(group, GATEWAY_DEPLOY, data, version, check)

    target = _Target(label, name, secret, using, rollback is not False, roll, "the gateway")
    return _rotate(target, value, batch, destroy_old, say, session)


def _refuse_a_shared_key(using: list[Host], client: str, value: str, session: Session) -> None:
    """The gateway maps a key's digest to one client: a new key that is another active
    client's would stop every deploy of these hosts (gpunode/haproxy.py refuses it)."""
    digest = front.key_digest(value)
    seen: set[tuple[str, str, str]] = set()
    for h in using:
        for other, c in front.active_clients(h.config).items():
            where = (c.key.mount, c.key.path, c.key.key)
            if other == client or where in seen:
                continue
            seen.add(where)
            source = Secret(mount=c.key.mount, path=c.key.path, key=c.key.key)
            theirs = session.read(f"{CLIENT_PREFIX}{other}.key", source)
            if front.key_digest(theirs.value) == digest:
                raise RotateError(
                    f"{CLIENT_PREFIX}{client}: the new key is the key of client {other} on "
                    f"host {h.name} (allowed: a key no other client has; --generate makes one)"
                )


@dataclass
class _Target:
    """What one rotation rolls out: its report label, its Vault source, its hosts, whether a
    failing host is put back, and how a batch of hosts gets a version and is checked."""

    label: str
    name: str  # the name in Vault errors
    secret: Secret
    hosts: list[Host]
    rollback: bool
    roll: Callable[[list[Host], int], list[HostResult]]
    fix: str  # what to fix when a host fails


def _rotate(
    target: _Target,
    value: str,
    batch: int,
    destroy_old: bool,
    say: Callable[[str], None],
    session: Session,
) -> Rotation:
    label, name, secret, using = target.label, target.name, target.secret, target.hosts
    old = int(session.metadata(name, secret).get("current_version") or 0)
    new = session.write(name, secret, value, cas=old)
    rotation = Rotation(secret=name, old_version=old, new_version=new)
    say(f"{label}: wrote version {new} of {secret.where()} (check-and-set on {old})")

    for start in range(0, len(using), batch):
        group = using[start : start + batch]
        try:
            results = target.roll(group, new)
        except VaultError as exc:  # Vault went away mid-rotation: nothing more is touched
            rest = [h.name for h in using[start:]]
            rotation.results += [HostResult(h, new, False, "not touched") for h in rest]
            say(
                f"{label}: rotation stopped: {exc}; not touched: {', '.join(rest)}; "
                f"Vault's latest version is {new} (the next deploy rolls it out)"
            )
            return rotation
        rotation.results += results
        for r in results:
            say(f"{r.host}: version {new}: {'healthy' if r.ok else 'FAILED'}: {r.detail}")
        failed = [r for r in results if not r.ok]
        if not failed:
            continue
        if target.rollback and old:
            back = {h.name: h for h in group if h.name in {r.host for r in failed}}
            for r in target.roll(list(back.values()), old):
                match = next(f for f in failed if f.host == r.host)
                match.rolled_back_to = old if r.ok else None
                state = "healthy" if r.ok else "STILL FAILING"
                say(f"{r.host}: rolled back to version {old}: {state}: {r.detail}")
        rest = [h.name for h in using[start + batch :]]
        say(
            f"{label}: rotation stopped at {', '.join(f.host for f in failed)}; "
            f"not touched: {', '.join(rest) or 'none'}; Vault's latest version is {new} "
            f"(the next deploy rolls it out: fix {target.fix}, or write the old value back)"
        )
        return rotation

    if destroy_old and old:
        session.destroy(name, secret, [old])
        rotation.destroyed = [old]
        say(f"{label}: destroyed version {old}")
    say(f"{label}: version {new} is on {len(using)} host(s), all healthy")
    return rotation


def _roll_out(
    group: list[Host], deploy_file: Path, data: dict[str, Any], version: int, check: Check
) -> list[HostResult]:
    """Deploy ``deploy_file`` with ``data`` (names and a version: no value, the deploy reads
    it from Vault) to ``group`` and ``check`` each host the deploy succeeded on.

    It runs through gpunode.commands.run. A Vault error while planning is raised (nothing
    was deployed in this group); the hosts stay connected for the checks."""
    inventory = run.inventory_from((h.name, host_data(h)) for h in group)
    results: dict[str, HostResult] = {}
    with run.prepare(inventory, deploy_file, data=data, detect_changes=False) as deploy:
        for planned in deploy.results().values():
            if isinstance(planned.exception, VaultError):
                raise planned.exception
        outcome = deploy.execute(all_or_nothing=True)
        for h in group:
            error = outcome[h.name].error
            if error is None:
                results[h.name] = check(deploy.host(h.name), h)
                continue
            if error.startswith("operation failed") or error == "the deploy failed":
                error = "the deploy failed (file or service restart)"
            results[h.name] = HostResult(h.name, version, False, error)
    return [results[h.name] for h in group]


def _wait_healthy(host, secret: Secret, version: int) -> HostResult:  # noqa: ANN001
    if not secret.restart:
        return HostResult(host.name, version, True, "file written (no service to check)")
    checks = []
    for service in secret.restart:
        checks.append(
            (service.name, StringCommand("systemctl", "is-active", "--quiet", service.name))
        )
        if service.health_url:
            checks.append(
                (
                    service.health_url,
                    StringCommand(
                        "curl",
                        "-fsS",
                        "-o",
                        "/dev/null",
                        "--max-time",
                        "5",
                        shlex.quote(service.health_url),
                    ),
                )
            )
    started = time.monotonic()
    deadline = started + secret.health_timeout
    while True:
        failing = ""
        for what, command in checks:
            ok, _ = host.run_shell_command(command)
            if not ok:
                failing = what
                break
        if not failing:
            took = time.monotonic() - started
            names = ", ".join(s.name for s in secret.restart)
            return HostResult(host.name, version, True, f"{names} healthy after {took:.1f} s")
        if time.monotonic() > deadline:
            return HostResult(
                host.name,
                version,
                False,
                f"health check {failing} failing after {secret.health_timeout:.0f} s",
            )
        time.sleep(0.5)


# --- the gateway's health, on the node and from the controller --------------------------------


def _local_address(config: NodeConfig) -> tuple[str, str]:
    """(address, address:port) of the gateway's listener as seen on the node: 127.0.0.1 for a
    wildcard (``::`` binds IPv4 too: gpunode/haproxy.py's v4v6), else the address itself."""
    gw = config.gateway
    ip = ipaddress.ip_address(gw.listen)
    if ip.is_unspecified:
        return "127.0.0.1", f"127.0.0.1:{gw.port}"
    if ip.version == 6:
        return str(ip), f"[{ip}]:{gw.port}"
    return str(ip), f"{ip}:{gw.port}"


def health_command(config: NodeConfig) -> StringCommand:
    """On the node: the gateway answers ``/health`` with 200 over TLS (its own answer, no key;
    the certificate is not checked here, the controller's request checks it). curl when the
    node has it, else ``openssl s_client`` (the gateway role installs openssl)."""
    host, hostport = _local_address(config)
    url = shlex.quote(f"https://{hostport}{HEALTH_ROUTE}")
    request = shlex.quote(
        f"GET {HEALTH_ROUTE} HTTP/1.1\\r\\nHost: {host}\\r\\nConnection: close\\r\\n\\r\\n"
    )
    curl = f"curl -fsS -k -o /dev/null --max-time 5 {url}"
    s_client = (
        f"printf {request} | timeout 5 openssl s_client -quiet -connect {shlex.quote(hostport)} "
        "2>/dev/null | head -n 1 | grep -q '^HTTP/1\\.[01] 200 '"
    )
    return StringCommand(f"if command -v curl >/dev/null 2>&1; then {curl}; else {s_client}; fi")


def digest_command(client: str, digest: str) -> StringCommand:
    """On the node: the keys map holds ``<digest> <client>`` (a digest, never a key)."""
    line = shlex.quote(f"{digest} {client}")
    return StringCommand("grep", "-qxF", "--", line, shlex.quote(front.KEYS_MAP))


def _gateway_healthy(  # noqa: ANN001
    host, node: Host, client: str, key: str, version: int, ca_pem: str
) -> HostResult:
    config = node.config
    gw = config.gateway
    sudo = {"_sudo": True} if node.connection.user != "root" else {}  # the map is 0640
    on_node = [
        (f"{front.UNIT} active", StringCommand("systemctl", "is-active", "--quiet", front.UNIT)),
        ("/health 200 over TLS on the node", health_command(config)),
        (
            f"the key's SHA-256 in {front.KEYS_MAP}",
            digest_command(client, front.key_digest(key)),
        ),
    ]
    started = time.monotonic()
    deadline = started + GATEWAY_HEALTH_TIMEOUT
    remote: str | None = None  # why the controller does not ask, once known
    while True:
        failing = ""
        for what, command in on_node:
            ok, _ = host.run_shell_command(command, **sudo)
            if not ok:
                failing = what
                break
        if not failing:
            if remote is None:
                remote = _why_not_asked(node, client)
            if not remote:
                status = _ask_models(node, key, ca_pem)
                if status != 200:
                    failing = (
                        f"GET {MODELS_ROUTE} with key version {version} from the controller: "
                        f"{status}"
                    )
        if not failing:
            took = time.monotonic() - started
            checks = ", ".join(what for what, _ in on_node)
            asked = (
                f"GET {MODELS_ROUTE} with key version {version} from the controller: 200 "
                f"(TLS verified against the CA of {gw.tls.mount})"
                if not remote
                else f"{remote}: relying on the checks on the node"
            )
            return HostResult(node.name, version, True, f"{checks}; {asked} (after {took:.1f} s)")
        if time.monotonic() > deadline:
            return HostResult(
                node.name,
                version,
                False,
                f"health check {failing} failing after {GATEWAY_HEALTH_TIMEOUT:.0f} s",
            )
        time.sleep(0.5)


def _why_not_asked(node: Host, client: str) -> str:
    """Why the controller cannot send a request with the key ('' when it can)."""
    gw = node.config.gateway
    if gw.clients[client].mtls:
        return f"client {client} needs a client certificate (mtls), the controller has none"
    if MODELS_ROUTE not in gw.routes:
        return f"{MODELS_ROUTE} is not in gateway.routes"
    address = node.connection.address
    try:
        socket.create_connection((address, gw.port), timeout=REACH_TIMEOUT).close()
    except OSError:
        shown = f"[{address}]" if ":" in address else address
        return f"the controller cannot reach {shown}:{gw.port} within {REACH_TIMEOUT:.0f} s"
    return ""


class _TlsConnection(http.client.HTTPConnection):
    """HTTPS to ``host`` that verifies the certificate for ``server_name`` (the address, or the
    certificate's first name when the address is not in it). No proxy is ever used."""

    def __init__(
        self, host: str, port: int, server_name: str, context: ssl.SSLContext, timeout: float
    ) -> None:
        super().__init__(host, port, timeout=timeout)
        self.server_name = server_name
        self.context = context

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        try:
            self.sock = self.context.wrap_socket(sock, server_hostname=self.server_name)
        except BaseException:
            sock.close()
            raise


def _ask_models(node: Host, key: str, ca_pem: str) -> int | str:
    """GET /v1/models with ``key`` from the controller: the status, or what went wrong (never
    the key: it is only in the request's Authorization header)."""
    config = node.config
    address = node.connection.address
    names = front.certificate_names(config, node.name, address)
    ips = front.certificate_ips(config, address)
    server_name = address if address in names or address in ips else names[0]
    context = ssl.create_default_context(cadata=ca_pem)
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the issuing CA may be intermediate
    conn = _TlsConnection(address, config.gateway.port, server_name, context, REQUEST_TIMEOUT)
    try:
        conn.request("GET", MODELS_ROUTE, headers={"Authorization": f"Bearer {key}"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except ssl.SSLCertVerificationError as exc:
        return f"TLS verification failed ({exc.verify_message}; server name {server_name})"
    except (OSError, http.client.HTTPException) as exc:
        return f"no answer ({type(exc).__name__})"
    finally:
        conn.close()


def main(inventory: str, name: str, value: str, **kwargs) -> int:  # noqa: ANN003
    """CLI entry: 0 when every host is healthy on the new version, 1 otherwise."""
    inv = load_inventory_file(inventory)
    try:
        rotation = rotate(list(inv.hosts.values()), name, value, **kwargs)
    except (RotateError, VaultError, ConfigError) as exc:
        print(f"gpunode rotate: {exc}", flush=True)
        return 1
    return 0 if rotation.ok else 1
