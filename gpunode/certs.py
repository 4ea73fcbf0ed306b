"""X.509 certificates of the gateway: what a PEM certificate says, and when it needs renewal.

Pure functions, no Vault and no node: the role (roles/gateway.py) and the certificate
operation (gpunode/operations/gateway.py) read the node's certificate, parse it here and
ask :func:`renewal_reason` whether to keep it; the Vault side is gpunode/clients/pki.py.

A certificate is renewed when it is missing or expired, when less than a third of its
lifetime is left (a 72h certificate is renewed from 48h on, so a daily drift run has two
chances before it expires), when its names or addresses are not the ones the config asks
for, when another CA signed it (the PKI mount got a new root), or when its lifetime is not
``gateway.tls.ttl``.

.. code:: python

    info = parse_certificate(pem)
    reason = renewal_reason(info, names=["gpu-01.example.com"], ips=["192.0.2.11"],
                            ttl_s=259200, ca_pem=issuer.ca_pem(), current_pem=pem)
    if reason:  # e.g. "its DNS names differ"
        ...
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.x509.oid import NameOID

RENEW_FRACTION = 3
"""Renew when less than 1/RENEW_FRACTION of the lifetime is left."""

LIFETIME_TOLERANCE = 0.10
"""A lifetime within 10% of ``gateway.tls.ttl`` counts as that TTL."""

BACKDATE_S = 60
"""Seconds a CA may backdate ``notBefore`` for clock skew on top of the tolerance (Vault's
PKI role default ``not_before_duration`` is 30s: a 60s TTL gives a 90s lifetime)."""

_PEM_CERT = re.compile(
    r"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+?-----END CERTIFICATE-----"
)


@dataclass(frozen=True)
class CertInfo:
    """The public facts of one certificate that decide its renewal."""

    serial: str
    """Lowercase hex bytes separated by ':', as Vault's ``serial_number``."""
    not_before: datetime
    """Timezone-aware, UTC."""
    not_after: datetime
    """Timezone-aware, UTC."""
    dns_names: tuple[str, ...]
    """The DNS names of its subjectAltName, in the certificate's order."""
    ip_addresses: tuple[str, ...]
    """The IP addresses of its subjectAltName (Python's compressed spelling)."""
    issuer: str
    """The issuer's name, RFC 4514."""
    common_name: str = ""
    """The subject's CN ("" without one)."""

    @property
    def lifetime_s(self) -> int:
        return int((self.not_after - self.not_before).total_seconds())


def serial_hex(serial: int) -> str:
    """A serial number the way Vault writes it: ``7e:65:b7:...`` (minimal big-endian bytes)."""
    raw = serial.to_bytes(max(1, (serial.bit_length() + 7) // 8), "big")
    return ":".join(f"{b:02x}" for b in raw)


def load_certificate(pem: str) -> x509.Certificate:
    """The first certificate of a PEM text: a lone certificate, or the leaf of a bundle
    (leaf, chain, key; any private key block in it is ignored and never echoed).

    Raises ValueError on anything else; the message never quotes the text."""
    if not isinstance(pem, str):
        raise ValueError(f"not PEM text (got {type(pem).__name__})")
    start = pem.find("-----BEGIN CERTIFICATE-----")
    if start < 0:
        raise ValueError(
            "no PEM certificate in the text (allowed: a '-----BEGIN CERTIFICATE-----' block)"
        )
    match = _PEM_CERT.match(pem, start)  # the first block, never a later one in its place
    if match is None:
        raise ValueError("the first PEM certificate block is damaged (not base64 to its END)")
    try:
        return x509.load_pem_x509_certificate(match.group(0).encode("ascii"))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # cryptography's message may quote bytes of the input: never shown
        raise ValueError("the PEM certificate block does not parse as X.509") from None


def parse_certificate(pem: str) -> CertInfo:
    """The :class:`CertInfo` of the first certificate of ``pem`` (see :func:`load_certificate`).

    Raises ValueError, with a message that quotes nothing of the input, on anything that is
    not a PEM certificate."""
    cert = load_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = (), ()
    except ValueError:  # a malformed extension: parsed lazily, raises here
        raise ValueError("the certificate's extensions do not parse") from None
    try:
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        common_name = str(cns[0].value) if cns else ""
        issuer = cert.issuer.rfc4514_string()
    except ValueError:
        raise ValueError("the certificate's subject or issuer does not parse") from None
    return CertInfo(
        serial=serial_hex(cert.serial_number),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        dns_names=dns,
        ip_addresses=ips,
        issuer=issuer,
        common_name=common_name,
    )


def when(moment: datetime) -> str:
    """A moment for the op log: ``2025-01-31 12:00:00 UTC``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ip_set(values: list[str] | tuple[str, ...]) -> set[object]:
    out: set[object] = set()
    for value in values:
        try:
            out.add(ipaddress.ip_address(value))
        except ValueError:
            out.add(value)  # compared verbatim; never equal to a parsed address
    return out


def issued_by(current_pem: str, ca_pem: str) -> bool:
    """The first certificate of ``current_pem`` carries a valid signature of the CA in
    ``ca_pem`` (and names it as its issuer). Raises ValueError when ``ca_pem`` is not a
    certificate; an unparsable ``current_pem`` is not issued by it."""
    ca = load_certificate(ca_pem)
    try:
        leaf = load_certificate(current_pem)
    except ValueError:
        return False
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def renewal_time(current: CertInfo) -> datetime:
    """When :func:`renewal_reason` starts to ask for a new certificate by time alone: a
    third of its lifetime before it expires."""
    return current.not_after - timedelta(seconds=current.lifetime_s / RENEW_FRACTION)


def renewal_reason(
    current: CertInfo | None,
    *,
    names: list[str],
    ips: list[str],
    ttl_s: int,
    ca_pem: str | None,
    now: datetime | None = None,
    current_pem: str | None = None,
) -> str | None:
    """Why the certificate ``current`` must be replaced, for the op log; None: keep it.

    ``names``: the DNS names wanted, the first being the CN (SANs compare as sets);
    ``ips``: the IP SANs wanted; ``ttl_s``: ``gateway.tls.ttl``; ``ca_pem``: the CA that
    issues now, checked against ``current_pem`` (its signature) when both are given;
    ``now``: default the current time."""
    if current is None:
        return "no certificate"
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now: a naive datetime (allowed: timezone-aware, e.g. UTC)")
    if current.not_after <= now:
        return f"expired {when(current.not_after)}"
    if ca_pem and current_pem and not issued_by(current_pem, ca_pem):
        return "issued by another CA"
    if names and current.common_name.lower() != names[0].lower():
        return "its common name differs"
    if {n.lower() for n in current.dns_names} != {n.lower() for n in names}:
        return "its DNS names differ"
    if _ip_set(current.ip_addresses) != _ip_set(ips):
        return "its IP addresses differ"
    lifetime = current.lifetime_s
    low = ttl_s * (1 - LIFETIME_TOLERANCE)
    high = ttl_s * (1 + LIFETIME_TOLERANCE) + BACKDATE_S
    if not low <= lifetime <= high:
        return "its lifetime differs from gateway.tls.ttl"
    left = (current.not_after - now).total_seconds()
    if left * RENEW_FRACTION < lifetime:
        return f"expires {when(current.not_after)}: less than a third of its lifetime left"
    return None
