"""HAProxy's configuration for the inference gateway: the whole haproxy.cfg and the map files
it reads (templates/gateway/haproxy.cfg.j2).

What a request meets, in order (the frontend ``gateway``, TLS only):

1. ``/health`` is answered by HAProxy itself, without a key: 200 while at least one
   fronted backend is up, else 503.
2. A path that is not exactly one of ``gateway.routes`` gets 404, a route asked with the
   wrong method (GET for /v1/models, POST for the others) 405, before any key is looked at.
3. ``Authorization: Bearer <key>``: the key's SHA-256 is looked up in ``keys.map``
   (``<sha256> <client>``, so the node never holds a key in clear); missing or unknown:
   401 with ``WWW-Authenticate: Bearer``. The header is deleted before a backend sees it.
   A client with ``mtls`` (``mtls.map``) also needs a TLS client certificate of the
   gateway's CA whose CN is its name: without one, or with another, 403 (see below).
4. A POST without Content-Length: 411; a body over ``gateway.max_body``: 413.
5. Per-client limits from maps, counted in stick tables keyed by the client's name: requests
   in flight (``sc_trackers``: the streams tracking the client's entry right now), requests
   in any one second, requests over ten seconds; over any of them: 429 with Retry-After.
6. The body's ``model`` picks the backend (``models.map``: served name -> backend);
   unknown: 404, missing: 400, not in the client's ``models``: 403. GET /v1/models goes to
   the first fronted service.

Client certificates (``gateway.clients.<name>.mtls``): only when an active client has
``mtls`` does the TLS listener ask for a certificate (``ca-file <client CA> verify
optional``); a node without such a client never asks. ``verify optional``: a client without
``mtls`` needs none. ``ca-ignore-err all crt-ignore-err all``: a presented certificate that
fails verification (expired, of another CA, not yet valid) does not abort the handshake, so
a client without ``mtls`` is not refused for a certificate it did not need to send, and a
client with ``mtls`` gets a JSON 403 it can read instead of a bare TLS alert. The HTTP rules
make up for what the handshake no longer refuses: a client of ``mtls.map`` passes only when
a certificate was used (``ssl_c_used``, also on a resumed session), it verified
(``ssl_c_verify``: the TLS library's result, any error at any depth, kept in a resumed
session, unlike ``ssl_c_err``/``ssl_c_ca_err``; it needs a chain up to a self-signed root
of the CA file, so for an intermediate PKI mount the file holds the whole chain, and a
certificate for client authentication, not a server's), and both its first and its last subject CN
equal the client's name (a certificate with two CNs names no one client). The key is
checked first: a certificate alone identifies nobody. No CRL: a client's access is revoked
with its key (``revoked``), which also ends its mTLS pass.

Every answer of the gateway itself is a JSON body. One log line per request names the
client, the matched route (never the raw path or query string), the status, the time and the
backend; never a header, a body or a certificate's subject. A second frontend serves
HAProxy's Prometheus exporter on ``gateway.metrics_port``.

Every value reaches the files through a renderer of gpunode/render.py (``haproxy_*``), which
refuses what HAProxy would read otherwise. The output depends on the config only (sorted
maps, no timestamps), so a converged node sees no change.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from gpunode.gateway import (
    CERT_FILE,
    PROXY_USER,
    TLS_DIR,
    Server,
    active_clients,
    backends,
)
from gpunode.render import (
    environment,
    haproxy_address,
    haproxy_map_line,
    haproxy_path,
    haproxy_string,
    haproxy_word,
)
from gpunode.schema.gateway import HAPROXY_DIR, HEALTH_ROUTE
from gpunode.schema.node import NodeConfig
from gpunode.schema.runtimes import PROFILES
from gpunode.schema.types import ConfigError


@dataclass(frozen=True)
class Paths:
    """Where HAProxy's files live: :data:`NODE` on a node; tests pass temporary ones."""

    config_dir: str
    """The map files (gpunode.schema.gateway.HAPROXY_DIR on a node)."""
    cert_file: str
    """PEM: the leaf certificate, the CA chain and the private key."""
    user: str | None
    """The user and group HAProxy drops to; None: none (no user/group lines)."""
    chroot: str | None
    """The directory HAProxy chroots to; None: none."""
    stats_socket: str | None
    """The admin socket (mode 660, level admin, expose-fd listeners); None: none."""
    client_ca_file: str
    """PEM: the CA(s) a client certificate must chain to (the gateway's PKI CA); read only
    when an active client has ``mtls``."""


# The CA certificate of gateway.tls.mount (public), written by the gateway's role whenever
# the gateway is enabled; haproxy.cfg names it only when an active client has mtls.
CLIENT_CA_FILE = f"{TLS_DIR}/client-ca.pem"

NODE = Paths(
    config_dir=HAPROXY_DIR,
    cert_file=CERT_FILE,
    user=PROXY_USER,
    chroot="/var/lib/haproxy",
    stats_socket="/run/haproxy/admin.sock",
    client_ca_file=CLIENT_CA_FILE,
)

# The map files, in Paths.config_dir.
KEYS_MAP = "keys.map"  # <sha256 of the key> <client>
RATE_MAP = "rate.map"  # <client> <requests allowed over 10 s: 10 x rate>
BURST_MAP = "burst.map"  # <client> <requests allowed in any one second>
CONCURRENT_MAP = "concurrent.map"  # <client> <requests in flight>
RESTRICTED_MAP = "restricted.map"  # <client> 1, for a client with a `models` list
CLIENT_MODELS_MAP = "client-models.map"  # <client>/<served name> 1
MODELS_MAP = "models.map"  # <served name> <backend>
MTLS_MAP = "mtls.map"  # <client> 1, for a client with mtls
MAPS = (
    KEYS_MAP,
    RATE_MAP,
    BURST_MAP,
    CONCURRENT_MAP,
    RESTRICTED_MAP,
    CLIENT_MODELS_MAP,
    MODELS_MAP,
    MTLS_MAP,
)

RATE_PERIOD_S = 10  # `rate` is requests/s sustained over this many seconds
HEADER_ROOM = 32 * 1024  # tune.bufsize = max_body + this: the request line and headers
CHECK_INTER_S = 2  # backend health checks: every 2 s, down after 2 failures, up after 2

# Mozilla's "intermediate" TLS configuration (ssl-config.mozilla.org, guidelines 5.7).
TLS_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    )
)
TLS_CIPHERSUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

# The routes that take a GET; every other route of gateway.routes takes a POST.
GET_ROUTES = frozenset({"/v1/models"})

_SHA256 = re.compile(r"[0-9a-f]{64}")


def backend_name(service: str) -> str:
    """The HAProxy backend of a fronted service (service names hold no '_', so the ``be_``
    prefix keeps them apart from the stick-table backends ``st_*``)."""
    return haproxy_word(f"be_{service}", f"inference.services.{service}")


def model_backends(config: NodeConfig) -> dict[str, tuple[str, list[Server]]]:
    """served model name -> (its HAProxy backend, the servers that serve it). A backend is
    named after its first server's service (``be_<service>``), or ``be_<service>_<n>`` when
    an earlier model's backend has that name already (upstreams may share service names)."""
    out: dict[str, tuple[str, list[Server]]] = {}
    taken: set[str] = set()
    for model, servers in backends(config).items():
        base = servers[0].service
        name, n = backend_name(base), 2
        while name in taken:
            name, n = backend_name(f"{base}_{n}"), n + 1
        taken.add(name)
        out[model] = (name, servers)
    return out


def _error(status: int, message: str, kind: str) -> str:
    """An OpenAI-style JSON error body, as a single-quoted haproxy.cfg argument."""
    body = json.dumps({"error": {"message": message, "type": kind, "code": status}})
    return haproxy_string(body, f"the {status} body")


# Every answer the gateway gives itself: status -> body.
ERRORS = {
    400: _error(400, "the request body names no model", "invalid_request_error"),
    401: _error(401, "missing or unknown API key", "authentication_error"),
    403: _error(403, "this API key may not use this model", "permission_error"),
    404: _error(404, "no such route", "not_found_error"),
    405: _error(405, "method not allowed on this route", "invalid_request_error"),
    411: _error(411, "a Content-Length is required", "invalid_request_error"),
    413: _error(413, "the request body is too large", "invalid_request_error"),
    429: _error(429, "rate limit exceeded, retry later", "rate_limit_error"),
}
UNKNOWN_MODEL = _error(404, "no such model", "not_found_error")
CERT_REQUIRED = _error(
    403, "this API key needs a valid client certificate issued to its client", "permission_error"
)
# HAProxy's own errors (a malformed request, a slow client, no backend), as JSON too.
HTTP_ERRORS = {
    400: _error(400, "bad request", "invalid_request_error"),
    408: _error(408, "request timeout", "timeout_error"),
    500: _error(500, "internal error", "server_error"),
    502: _error(502, "bad gateway", "server_error"),
    503: _error(503, "no backend available", "server_error"),
    504: _error(504, "the backend did not answer in time", "timeout_error"),
}
HEALTH_UP = haproxy_string(json.dumps({"status": "ok"}), "the health body")
HEALTH_DOWN = haproxy_string(json.dumps({"status": "down"}), "the health body")
# One line per request; every field is a value HAProxy knows, or a variable set from an
# allow-list (the client's name from keys.map, the route only when it is an allowed one).
LOG_FORMAT = haproxy_string(
    "gateway client=%[var(txn.client)] route=%[var(txn.route)] status=%ST time_ms=%Ta "
    "backend=%b src=%ci term=%ts bytes=%B",
    "log-format",
)


def render_config(config: NodeConfig, paths: Paths = NODE) -> str:
    """The whole haproxy.cfg of a node whose gateway is enabled."""
    gw = config.gateway
    models = model_backends(config)
    if not models:
        raise ConfigError(
            "gateway: no inference service to front (allowed: gateway.enabled with at least "
            "one enabled service in inference.services, or hosts in gateway.upstreams)"
        )
    at = "gateway"
    backends = []
    for name, servers in models.values():
        first = servers[0]
        backends.append(
            {
                "name": name,
                "health": haproxy_path(PROFILES[first.runtime].health_path, first.where),
                "servers": [
                    {
                        "name": haproxy_word(s.name, s.where),
                        "address": haproxy_address(s.address, s.port, f"{s.where}.listen"),
                    }
                    for s in servers
                ],
            }
        )
    routes = [haproxy_path(r, f"{at}.routes") for r in gw.routes]
    maps = {m: haproxy_path(f"{paths.config_dir}/{m}", "the map directory") for m in MAPS}
    context: dict[str, Any] = {
        "maxconn": gw.maxconn,
        # The metrics frontend and health checks get their own room above the clients'.
        "global_maxconn": gw.maxconn + 100,
        "bufsize": gw.max_body + HEADER_ROOM,
        "hard_stop_after": gw.server_timeout + gw.request_timeout + 30,
        "min_version": haproxy_word(gw.tls.min_version, f"{at}.tls.min_version"),
        "ciphers": haproxy_word(TLS_CIPHERS, "ciphers"),
        "ciphersuites": haproxy_word(TLS_CIPHERSUITES, "ciphersuites"),
        "user": haproxy_word(paths.user, "user") if paths.user else None,
        "chroot": haproxy_path(paths.chroot, "chroot") if paths.chroot else None,
        "stats_socket": (
            haproxy_path(paths.stats_socket, "stats socket") if paths.stats_socket else None
        ),
        "bind": haproxy_address(gw.listen, gw.port, f"{at}.listen"),
        "metrics_bind": haproxy_address(gw.listen, gw.metrics_port, f"{at}.listen"),
        "v4v6": gw.listen == "::",
        "cert_file": haproxy_path(paths.cert_file, "the certificate file"),
        # Asked for only when a client needs it: a node without one never requests a
        # certificate (nor reads the file).
        "client_ca_file": (
            haproxy_path(paths.client_ca_file, "the client CA file")
            if any(c.mtls for c in active_clients(config).values())
            else None
        ),
        "timeouts": {
            "http_request": gw.request_timeout,
            "client": gw.client_timeout,
            "server": gw.server_timeout,
            "connect": gw.connect_timeout,
        },
        "max_body": gw.max_body,
        "health_route": haproxy_path(HEALTH_ROUTE, "the health route"),
        "routes": routes,
        "methods": [(r, "GET" if r in GET_ROUTES else "POST") for r in routes],
        "models_route": "/v1/models" if "/v1/models" in routes else None,
        "rate_period": RATE_PERIOD_S,
        "check_inter": CHECK_INTER_S,
        "backends": backends,
        "maps": maps,
        "errors": ERRORS,
        "unknown_model": UNKNOWN_MODEL,
        "cert_required": CERT_REQUIRED,
        "http_errors": HTTP_ERRORS,
        "health_up": HEALTH_UP,
        "health_down": HEALTH_DOWN,
        "log_format": LOG_FORMAT,
    }
    return environment("gateway").get_template("haproxy.cfg.j2").render(**context)


def map_files(config: NodeConfig, digests: dict[str, str], paths: Paths = NODE) -> dict[str, str]:
    """Every map file haproxy.cfg reads: absolute path -> text. ``digests``: client name ->
    SHA-256 (lowercase hex) of its key, for the active clients; a digest of a revoked or
    unknown client is left out (its key must not pass), an active client without one is an
    error, and so are two clients with the same digest (the map would give one name to both)."""
    clients = active_clients(config)
    keys: dict[str, str] = {}
    for name in clients:
        where = f"gateway.clients.{name}"
        digest = digests.get(name)
        if digest is None:
            raise ConfigError(f"{where}: no key digest (allowed: the SHA-256 of its key)")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ConfigError(
                f"{where}: the key digest is not a SHA-256 (allowed: 64 lowercase hex digits)"
            )
        if digest in keys:
            raise ConfigError(
                f"{where}: the same key as client {keys[digest]} (allowed: one key per client)"
            )
        keys[digest] = name
    rate, burst, concurrent, restricted, allowed, mtls = {}, {}, {}, {}, {}, {}
    for name, client in clients.items():
        rate[name] = str(RATE_PERIOD_S * client.rate)
        burst[name] = str(client.effective_burst())
        concurrent[name] = str(client.concurrent)
        if client.models:
            restricted[name] = "1"
            allowed.update({f"{name}/{model}": "1" for model in client.models})
        if client.mtls:
            mtls[name] = "1"
    models = {model: name for model, (name, _) in model_backends(config).items()}
    content = {
        KEYS_MAP: keys,
        RATE_MAP: rate,
        BURST_MAP: burst,
        CONCURRENT_MAP: concurrent,
        RESTRICTED_MAP: restricted,
        CLIENT_MODELS_MAP: allowed,
        MODELS_MAP: models,
        MTLS_MAP: mtls,
    }
    files = {}
    for map_name, entries in content.items():
        path = haproxy_path(f"{paths.config_dir}/{map_name}", "the map directory")
        lines = [haproxy_map_line(k, v, map_name) for k, v in sorted(entries.items())]
        files[path] = f"# {map_name}: written by gpunode (gpunode/haproxy.py)\n" + "".join(lines)
    return files
