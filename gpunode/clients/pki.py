"""The gateway's TLS certificate from Vault's (or OpenBao's) PKI secrets engine, through hvac.

The controller issues the certificate with its own Vault login (gpunode/clients/vault.py's
:class:`~gpunode.clients.vault.Session`) from ``<mount>/issue/<role>``; the node never
talks to Vault. :meth:`Issuer.check` runs while the deploy file runs, before any
operation is added: everything that would make issuing fail later (no PKI engine, no
role, a policy without ``update`` on the issue path, a TTL above the role's maximum, IP
SANs or names the role refuses) stops the run with one error naming the key. Issuing
itself (:meth:`Issuer.issue`) happens only when the certificate operation executes; when
a certificate is due is decided by gpunode/certs.py.

.. code:: python

    issuer = Issuer(session_for(config.vault), "pki", "gpunode-gateway")
    issuer.check(["gpu-01.example.com"], ["192.0.2.11"], 259200, "host gpu-01: gateway.tls")
    issued = issuer.issue(["gpu-01.example.com"], ["192.0.2.11"], 259200)
    issued.bundle()  # leaf, CA chain, private key: HAProxy's crt file

The private key exists only inside :class:`Issued` (never in its ``repr``) and in the
bundle handed to the private-file operation; no error message holds a token or a key.

:func:`setup_pki` prepares a mount and role with a root token: the lab and the tests
use it; in production whoever owns the PKI creates the role, and the controller's
AppRole gets :data:`CONTROLLER_POLICY`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from gpunode.certs import load_certificate, parse_certificate, when
from gpunode.clients.vault import Session, VaultError

if TYPE_CHECKING:
    import hvac

CONTROLLER_POLICY = """\
# Issue the gateway's certificate (POST <mount>/issue/<role>).
path "pki/issue/gpunode-gateway" {
  capabilities = ["update"]
}
# Read the role before issuing: its max_ttl, allowed names and IP SANs are checked
# before anything is written on a node.
path "pki/roles/gpunode-gateway" {
  capabilities = ["read"]
}
# The issuing CA certificate (public; also unauthenticated in Vault and OpenBao): a node's
# certificate signed by another CA is replaced.
path "pki/cert/ca" {
  capabilities = ["read"]
}
# Look up this token's own capabilities on the paths above (also in the default policy).
path "sys/capabilities-self" {
  capabilities = ["update"]
}
"""
"""The HCL policy lines the controller's AppRole needs to issue the gateway certificate,
for the default ``gateway.tls.mount`` (pki) and ``gateway.tls.role`` (gpunode-gateway):
use :func:`controller_policy` for others. ``sys/internal/ui/mounts/<mount>`` (the mount's
type and maximum lease TTL) needs nothing more: Vault answers it to any token with a
capability under the mount."""

# mount: KV_PATH-like segments; role: Vault role names. Both land in request paths.
MOUNT_RE = r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*"
ROLE_RE = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
ISSUER_REF_RE = r"[A-Za-z0-9_-]{1,128}"

T = TypeVar("T")


def controller_policy(mount: str = "pki", role: str = "gpunode-gateway") -> str:
    """:data:`CONTROLLER_POLICY` for another mount or role."""
    _names(mount, role)
    return CONTROLLER_POLICY.replace("pki/", f"{mount}/").replace("/gpunode-gateway", f"/{role}")


def _names(mount: str, role: str) -> None:
    if not re.fullmatch(MOUNT_RE, mount or "") or ".." in mount:
        raise VaultError(
            "gateway.tls.mount: not a PKI mount path (allowed: letters, digits, '_', '.', '-' "
            "in '/'-separated segments, e.g. pki)"
        )
    if not re.fullmatch(ROLE_RE, role or ""):
        raise VaultError(
            "gateway.tls.role: not a PKI role name (allowed: letters, digits, '_', '.', '-')"
        )


def duration(seconds: int) -> str:
    """Seconds the way the config writes durations: 72h, 90m, 45s."""
    if seconds and seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds and seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


@dataclass(frozen=True)
class Issued:
    """A certificate just issued: leaf, CA chain and private key. ``repr`` and ``str`` never
    show the key."""

    serial: str
    certificate: str
    """The leaf, PEM."""
    ca_chain: tuple[str, ...]
    """PEM certificates, the issuing CA first."""
    private_key: str = field(repr=False)

    def __repr__(self) -> str:
        return (
            f"Issued(serial={self.serial!r}, certificate=<{len(self.certificate)} chars>, "
            f"ca_chain=<{len(self.ca_chain)} certificate(s)>, private_key=*MASKED*)"
        )

    __str__ = __repr__

    def bundle(self) -> bytes:
        """HAProxy's ``crt`` file: the leaf, then the CA chain, then the private key."""
        parts = [self.certificate, *self.ca_chain, self.private_key]
        return "".join(p.strip() + "\n" for p in parts).encode("ascii")


class Issuer:
    """One PKI role of one mount, used through one Vault :class:`Session`."""

    def __init__(self, session: Session, mount: str, role: str) -> None:
        _names(mount, role)
        self.session = session
        self.mount = mount
        self.role = role
        self._role_data: dict[str, Any] | None = None
        self._mount_max_ttl = 0
        self._ca: str | None = None

    def __repr__(self) -> str:
        return f"Issuer({self.session.config.addr!r}, {self.mount!r}, {self.role!r})"

    @property
    def issue_path(self) -> str:
        return f"{self.mount}/issue/{self.role}"

    @property
    def role_path(self) -> str:
        return f"{self.mount}/roles/{self.role}"

    # -- plumbing
    def _client(self, what: str) -> hvac.Client:
        try:
            return self.session.login()
        except VaultError as exc:
            raise VaultError(f"{what}: {exc}") from None

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        return self.session._call(what, fn)

    def _read(self, client: hvac.Client, what: str, path: str) -> dict[str, Any] | None:
        """GET ``path``: its JSON answer, None on 404 or 403 (the caller says which)."""
        import hvac.exceptions as hx

        def read() -> dict[str, Any] | None:
            try:
                resp = client.adapter.get(f"/v1/{path}")
            except (hx.InvalidPath, hx.Forbidden):
                return None
            return resp if isinstance(resp, dict) else None

        return self._call(what, read)

    # -- checks before anything is written
    def check(self, names: list[str], ips: list[str], ttl_s: int, where: str) -> None:
        """Raise :class:`VaultError` naming ``where`` and the key when issuing a certificate
        for ``names`` (the first is its CN), ``ips`` and ``ttl_s`` would fail or give a
        certificate HAProxy's clients refuse. Issues nothing, writes nothing.

        The names check follows the role's rules (allow_any_name, allowed_domains with
        allow_bare_domains, allow_subdomains, allow_glob_domains, allow_localhost) on a
        best-effort basis: templated domains are not evaluated."""
        client = self._client(f"{where}: checking the PKI role {self.issue_path}")
        self._check_capabilities(client, where)
        self._check_mount(client, where)
        role = self._read_role(client, where)
        self._check_role_kind(role, where)
        self._check_ttl(client, role, ttl_s, where)
        self._check_ips(role, ips, where)
        self._check_names(role, names, where)

    def _check_capabilities(self, client: hvac.Client, where: str) -> None:
        import hvac.exceptions as hx

        paths = [self.issue_path, self.role_path]
        what = f"{where}.role: looking up this login's capabilities on {', '.join(paths)}"

        def lookup() -> dict[str, Any] | None:
            try:
                resp = client.adapter.post("/v1/sys/capabilities-self", json={"paths": paths})
            except hx.Forbidden:
                return None
            return resp if isinstance(resp, dict) else {}

        resp = self._call(what, lookup)
        if resp is None:
            raise VaultError(
                f"{what}: permission denied on sys/capabilities-self (allowed: a policy with "
                'path "sys/capabilities-self" { capabilities = ["update"] }, part of Vault\'s '
                "default policy; see gpunode.clients.pki.CONTROLLER_POLICY)"
            )
        data: dict[str, Any] = resp.get("data") or resp
        if not isinstance(data, dict):
            data = {}
        for path, need in ((self.issue_path, "update"), (self.role_path, "read")):
            caps = data.get(path) or []
            caps = [str(c) for c in caps if c != "deny"] if isinstance(caps, list) else []
            if not {need, "root"} & set(caps):
                raise VaultError(
                    f"{where}.role: the controller's Vault policy does not allow {need} on "
                    f"{path} (it allows: {', '.join(caps)[:100] or 'nothing'}; allowed: "
                    f'a policy with path "{path}" {{ capabilities = ["{need}"] }}, see '
                    "gpunode.clients.pki.CONTROLLER_POLICY)"
                )

    def _check_mount(self, client: hvac.Client, where: str) -> None:
        resp = self._read(
            client,
            f"{where}.mount: looking up the secrets engine at {self.mount}/",
            f"sys/internal/ui/mounts/{self.mount}",
        )
        data = (resp or {}).get("data") or {}
        kind = data.get("type")
        if kind is None:
            raise VaultError(
                f"{where}.mount: no secrets engine is mounted at {self.mount}/ (allowed: the "
                "path of a PKI secrets engine, e.g. pki; `bao secrets list` shows them)"
            )
        if kind != "pki":
            raise VaultError(
                f"{where}.mount: {self.mount}/ is a {str(kind)[:40]!r} secrets engine, not PKI "
                "(allowed: the path of a PKI secrets engine)"
            )
        config = data.get("config") or {}
        self._mount_max_ttl = int(config.get("max_lease_ttl") or 0)

    def _read_role(self, client: hvac.Client, where: str) -> dict[str, Any]:
        resp = self._read(client, f"{where}.role: reading {self.role_path}", self.role_path)
        role = (resp or {}).get("data")
        if not isinstance(role, dict):
            raise VaultError(
                f"{where}.role: role {self.role} does not exist on the PKI mount {self.mount} "
                "(allowed: an existing role: the PKI's owner creates it, e.g. `bao write "
                f"{self.role_path} allow_ip_sans=true server_flag=true max_ttl=720h ...`)"
            )
        self._role_data = role
        return role

    def _check_role_kind(self, role: dict[str, Any], where: str) -> None:
        at = f"{where}.role: role {self.role} on {self.mount}"
        if role.get("key_type") == "any":
            raise VaultError(
                f"{at} has key_type any, which signs CSRs only: it cannot issue a key "
                "(allowed: key_type ec or rsa)"
            )
        if role.get("server_flag") is False:
            raise VaultError(
                f"{at} has server_flag false: its certificates are not for TLS servers "
                "(allowed: server_flag true)"
            )
        if role.get("exclude_cn_from_sans") is True:
            raise VaultError(
                f"{at} has exclude_cn_from_sans true: clients would not find the first name "
                "in the certificate (allowed: false)"
            )

    def _check_ttl(self, client: hvac.Client, role: dict[str, Any], ttl_s: int, where: str) -> None:
        at = f"{where}.ttl"
        role_max = _seconds(role.get("max_ttl"))
        mount_max = self._mount_max_ttl
        if role_max:
            if ttl_s > role_max:
                raise VaultError(
                    f"{at}: {duration(ttl_s)} is above the max_ttl of role {self.role} on "
                    f"{self.mount} (allowed: at most {duration(role_max)})"
                )
        elif mount_max and ttl_s > mount_max:
            raise VaultError(
                f"{at}: {duration(ttl_s)} is above the maximum lease TTL of the mount "
                f"{self.mount} (role {self.role} sets no max_ttl; allowed: at most "
                f"{duration(mount_max)})"
            )
        ca = parse_certificate(self._ca_pem(client, where))
        end = datetime.now(UTC) + timedelta(seconds=ttl_s)
        if ca.not_after < end:
            raise VaultError(
                f"{at}: the issuing CA of {self.mount} expires {when(ca.not_after)}, before a "
                f"certificate of {duration(ttl_s)} would (allowed: a shorter ttl, or a CA "
                "valid for longer)"
            )

    def _check_ips(self, role: dict[str, Any], ips: list[str], where: str) -> None:
        import ipaddress

        if not ips:
            return
        at = f"{where}.ip_sans"
        if not role.get("allow_ip_sans"):
            raise VaultError(
                f"{at}: role {self.role} on {self.mount} does not allow IP SANs, but the "
                f"certificate would hold {', '.join(ips)} (allowed: a role with "
                "allow_ip_sans true, or reaching the host by a DNS name)"
            )
        cidrs = [c for c in role.get("allowed_ip_sans_cidr") or [] if isinstance(c, str)]
        if not cidrs:
            return
        nets = []
        for cidr in cidrs:
            try:
                nets.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError:
                return  # not ours to judge: Vault decides
        for ip in ips:
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                raise VaultError(f"{at}: {ip[:60]!r} is not an IP address") from None
            if not any(addr.version == n.version and addr in n for n in nets):
                raise VaultError(
                    f"{at}: {ip} is outside the allowed_ip_sans_cidr of role {self.role} on "
                    f"{self.mount} (allowed: {', '.join(cidrs)})"
                )

    def _check_names(self, role: dict[str, Any], names: list[str], where: str) -> None:
        if role.get("allow_any_name"):
            return
        for name in names:
            verdict = _name_allowed(role, name)
            if verdict is False:
                raise VaultError(
                    f"{where}.names: {name} is not allowed by role {self.role} on "
                    f"{self.mount} (allowed: {_allowed_names(role)})"
                )

    # -- issuing
    def issue(self, names: list[str], ips: list[str], ttl_s: int) -> Issued:
        """A new certificate for ``names`` (the first is its CN), ``ips`` and ``ttl_s``
        seconds, with its private key. Raises :class:`VaultError` when Vault refuses."""
        if not names:
            raise VaultError("gateway.tls.names: no name to issue a certificate for")
        what = f"gateway.tls: issuing a certificate for {names[0]} from {self.issue_path}"
        client = self._client(what)
        params = {
            "alt_names": ",".join(names),
            "ip_sans": ",".join(ips),
            "ttl": f"{int(ttl_s)}s",
            "format": "pem",
            "exclude_cn_from_sans": False,
        }
        try:
            resp = self._call(
                what,
                lambda: client.secrets.pki.generate_certificate(
                    self.role, names[0], extra_params=dict(params), mount_point=self.mount
                ),
            )
        except VaultError as exc:
            if "refused" not in str(exc):  # unreachable, sealed, denied: said as it is
                raise
            raise VaultError(
                f"{exc} (allowed: names, IP SANs and a ttl that role {self.role} on "
                f"{self.mount} permits; `bao read {self.role_path}` shows its rules)"
            ) from None
        data = (resp or {}).get("data") or {}
        cert, key = data.get("certificate"), data.get("private_key")
        if not isinstance(cert, str) or not isinstance(key, str) or "PRIVATE KEY" not in key:
            raise VaultError(f"{what}: Vault's answer holds no certificate and private key")
        try:
            info = parse_certificate(cert)
        except ValueError as exc:
            raise VaultError(f"{what}: Vault's certificate: {exc}") from None
        chain = data.get("ca_chain") or [data.get("issuing_ca")]
        chain = [c for c in chain if isinstance(c, str) and c.strip()]
        if not chain:
            raise VaultError(f"{what}: Vault's answer holds no CA certificate")
        serial = str(data.get("serial_number") or info.serial).lower()
        return Issued(serial=serial, certificate=cert, ca_chain=tuple(chain), private_key=key)

    def ca_pem(self) -> str:
        """The certificate of the CA that issues for this role (public), PEM."""
        if self._ca is None:
            what = f"gateway.tls: reading the CA certificate of {self.mount}"
            client = self._client(what)
            if self._role_data is None:  # its issuer_ref; without check(), best effort
                resp = self._read(client, f"{what}: reading {self.role_path}", self.role_path)
                data = (resp or {}).get("data")
                self._role_data = data if isinstance(data, dict) else {}
            self._ca = self._ca_pem(client, "gateway.tls")
        return self._ca

    def _ca_pem(self, client: hvac.Client, where: str) -> str:
        """The role's issuer (issuer_ref): the mount's default issuer from cert/ca, another
        one from issuer/<ref>/json (both public)."""
        if self._ca is not None:
            return self._ca
        ref = str((self._role_data or {}).get("issuer_ref") or "default")
        if ref == "default":
            path = f"{self.mount}/cert/ca"
        elif re.fullmatch(ISSUER_REF_RE, ref):
            path = f"{self.mount}/issuer/{ref}/json"
        else:
            raise VaultError(f"{where}.role: role {self.role} names an unusable issuer_ref")
        what = f"{where}.mount: reading the CA certificate from {path}"
        resp = self._read(client, what, path)
        pem = ((resp or {}).get("data") or {}).get("certificate")
        if not isinstance(pem, str) or not pem.strip():
            raise VaultError(
                f"{what}: {self.mount} has no CA certificate (allowed: a PKI mount with a "
                f"root or intermediate CA, e.g. `bao write {self.mount}/root/generate/internal`)"
            )
        try:
            load_certificate(pem)
        except ValueError as exc:
            raise VaultError(f"{what}: {exc}") from None
        self._ca = pem
        return pem


def _seconds(value: Any) -> int:
    """A TTL from a role read: seconds (int), or a duration string."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, str) and (m := re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", value)):
        h, mi, s = (int(g or 0) for g in m.groups())
        return h * 3600 + mi * 60 + s
    return 0


def _glob(pattern: str, name: str) -> bool:
    """Vault's allowed_domains glob: '*' matches any run of characters."""
    regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, name) is not None


def _name_allowed(role: dict[str, Any], name: str) -> bool | None:
    """Whether the role allows ``name``: True, False, or None when it cannot be told here
    (a templated domain, the token's display name)."""
    name = name.lower()
    if role.get("allow_localhost", True) and name in ("localhost", "localdomain"):
        return True
    unsure = bool(role.get("allow_token_displayname"))
    for raw in role.get("allowed_domains") or []:
        domain = str(raw).lower()
        if role.get("allowed_domains_template") and "{{" in domain:
            unsure = True
            continue
        if role.get("allow_bare_domains") and name == domain:
            return True
        if role.get("allow_subdomains"):
            base = domain[2:] if domain.startswith("*.") else domain
            if name.endswith("." + base):
                return True
        if role.get("allow_glob_domains") and "*" in domain and _glob(domain, name):
            return True
    return None if unsure else False


def _allowed_names(role: dict[str, Any]) -> str:
    """What the role allows, in words."""
    domains = [str(d) for d in role.get("allowed_domains") or []]
    parts = []
    if domains and role.get("allow_bare_domains"):
        parts.append(f"exactly {', '.join(domains)}")
    if domains and role.get("allow_subdomains"):
        parts.append(f"subdomains of {', '.join(domains)}")
    if domains and role.get("allow_glob_domains"):
        globs = [d for d in domains if "*" in d]
        if globs:
            parts.append(f"names matching {', '.join(globs)}")
    if role.get("allow_localhost", True):
        parts.append("localhost")
    allowed = "; ".join(parts) or "no DNS name"
    return f"{allowed}; or change the role's allowed_domains, or gateway.tls.names"


# --- lab and tests: a PKI mount and role, with a root token ------------------------------


def setup_pki(
    client: hvac.Client,
    mount: str = "pki",
    role: str = "gpunode-gateway",
    max_ttl: str = "720h",
    common_name: str = "gpunode lab CA",
    allowed: dict[str, Any] | None = None,
) -> str:
    """Enable a PKI engine at ``mount`` (if none), generate an internal root CA (if it has
    none), create or update ``role``, and return the CA certificate (PEM). Idempotent: a
    second call keeps the CA. Needs a root token (the lab's, the tests').

    The role issues EC P-256 server certificates with IP SANs and any hostname
    (``enforce_hostnames``) unless ``allowed`` narrows it, e.g. ``{"allowed_domains":
    ["example.com"], "allow_subdomains": True}`` (``allow_any_name`` is then false unless
    given). Its other keys are role parameters too (``allow_ip_sans``: False, ...)."""
    import hvac.exceptions as hx

    _names(mount, role)
    try:
        mounts = client.sys.list_mounted_secrets_engines()
        mounts = mounts.get("data", mounts)
        existing = mounts.get(f"{mount}/")
        if existing is None:
            client.sys.enable_secrets_engine(
                "pki",
                path=mount,
                description="gpunode gateway certificates",
                config={"max_lease_ttl": "87600h"},
            )
        elif existing.get("type") != "pki":
            raise VaultError(
                f"setup_pki: {mount}/ is a {existing.get('type')!r} engine, not PKI "
                "(allowed: a free path or a PKI mount)"
            )
        try:
            pem = (client.read(f"{mount}/cert/ca") or {}).get("data", {}).get("certificate")
        except hx.InvalidRequest:  # "no default issuer currently configured"
            pem = None
        if not pem:
            resp = client.secrets.pki.generate_root(
                "internal",
                common_name,
                extra_params={"ttl": "87600h", "key_type": "ec", "key_bits": 256},
                mount_point=mount,
            )
            pem = resp["data"]["certificate"]
        params: dict[str, Any] = {
            "allow_ip_sans": True,
            "allow_any_name": allowed is None,
            "allow_localhost": True,
            "enforce_hostnames": True,
            "server_flag": True,
            "client_flag": False,
            "key_type": "ec",
            "key_bits": 256,
            "max_ttl": max_ttl,
            "not_before_duration": "30s",
            "no_store": False,
        }
        params.update(allowed or {})
        client.secrets.pki.create_or_update_role(role, extra_params=params, mount_point=mount)
    except hx.VaultError as exc:
        errors = getattr(exc, "errors", None) or [type(exc).__name__]
        raise VaultError(
            f"setup_pki: mount {mount}, role {role}: {'; '.join(map(str, errors))[:300]}"
        ) from None
    return str(pem)
