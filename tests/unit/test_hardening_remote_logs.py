"""Remote logs (``hardening.remote_logs``, roles/hardening.py ``_remote_logs``): the schema, the
CA file the deploy reads, the RainerScript renderer, the rendered rsyslog drop-in, and the role
on every distro through pyinfra's ``@fake`` connector (tests/unit/harness.py).

Real parts: this machine's rsyslogd (Debian 12's 8.2302, package ``rsyslog`` with
``rsyslog-gnutls``: `make deps` installs them) reads the renderer's strings back, checks the
rendered drop-in with ``-N1``, and forwards over TLS on loopback to a second rsyslogd, with the
right CA and with a wrong one. The certificates are made here with ``cryptography``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from harness import (
    ALL,
    APT,
    Handler,
    Response,
    converged,
    host_info_output,
    run_deploys,
    run_sh,
)

from gpunode import firewall as firewall_rules
from gpunode import hardening, seal
from gpunode.commands.run import inventory_from
from gpunode.config import load
from gpunode.facts.firewall import FirewallState
from gpunode.facts.hardening import PrimaryGroup, SshdState, WritableSysctls
from gpunode.facts.rsyslog import RsyslogDropin
from gpunode.facts.server import HostInfo
from gpunode.operations.rsyslog import install_command
from gpunode.paths import REPO_ROOT
from gpunode.render import rainerscript_string
from gpunode.schema import hardening as hardening_schema
from gpunode.schema.node import NodeConfig
from gpunode.schema.types import ConfigError
from roles.hardening import hardening as hardening_role

HOST = "gpu-01"
NETWORK = {"admin_cidrs": ["127.0.0.0/8"], "monitoring_cidrs": ["10.40.0.0/24"]}
FIXTURES = Path(__file__).parent / "fixtures" / "hardening"


# --- certificates, made here ---------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_cert(
    cn: str,
    *,
    ca: bool | None = True,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    dns: tuple[str, ...] = (),
    key_usage: bool | None = None,
    days: tuple[int, int] = (-1, 30),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for ``cn`` (self-signed unless ``issuer``); ``ca``: basicConstraints
    CA:TRUE/CA:FALSE, or None for none at all; ``key_usage``: keyCertSign or not, None for no
    key usage; ``dns``: DNS names (a server certificate, with serverAuth)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    signer_cert, signer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(signer_cert.subject if signer_cert else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + timedelta(days=days[0]))
        .not_valid_after(now + timedelta(days=days[1]))
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
    if key_usage is not None:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=key_usage,
                crl_sign=key_usage,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
    if dns:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
    return builder.sign(signer_key, hashes.SHA256()), key


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.fixture(scope="module")
def ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    return make_cert("gpunode test logs CA", key_usage=True)


@pytest.fixture
def ca_file(tmp_path: Path, ca: tuple[x509.Certificate, Any]) -> Path:
    path = tmp_path / "logs-ca.pem"
    path.write_text(pem(ca[0]))
    return path


# --- config --------------------------------------------------------------------------------------


def load_one(remote_logs: Any, distro: str = "debian12") -> NodeConfig:
    raw = {
        "defaults": {
            "distro": distro,
            "network": NETWORK,
            "hardening": {"remote_logs": remote_logs},
        },
        "hosts": {HOST: {"connection": {"address": "127.0.0.2", "user": "root"}}},
    }
    return load(raw, source="test_remote_logs").hosts[HOST].config


def refused(remote_logs: Any) -> str:
    with pytest.raises(ConfigError) as exc:
        load_one(remote_logs)
    return str(exc.value)


GOOD = {"host": "logs.example.com", "ca_file": "/etc/gpunode/site/logs-ca.pem"}


def test_off_by_default() -> None:
    raw = {
        "defaults": {"distro": "debian12", "network": NETWORK},
        "hosts": {HOST: {"connection": {"address": "127.0.0.2"}}},
    }
    assert load(raw, source="t").hosts[HOST].config.hardening.remote_logs is None


@pytest.mark.parametrize(
    ("host", "kept"),
    [
        ("logs.example.com", "logs.example.com"),
        ("Logs.Example.COM", "logs.example.com"),  # DNS and certificate names have no case
        ("logs", "logs"),
        ("192.0.2.10", "192.0.2.10"),
        ("2001:DB8:0::1", "2001:db8::1"),  # canonical spelling
        ("a" * 63 + ".example.com", "a" * 63 + ".example.com"),
    ],
)
def test_a_name_or_an_address_is_accepted(host: str, kept: str) -> None:
    logs = load_one({**GOOD, "host": host}).hardening.remote_logs
    assert logs is not None
    assert (logs.host, logs.port, logs.queue_max_mb) == (kept, 6514, 256)
    assert logs.ca_file == GOOD["ca_file"]


@pytest.mark.parametrize(
    ("data", "key", "allowed"),
    [
        ({"host": "logs.example.com\nProxyCommand id"}, "host", "control character"),
        ({"host": "logs\t"}, "host", "control character"),
        ({"host": "logs example.com"}, "host", "a DNS name such as logs.example.com"),
        ({"host": "logs..example.com"}, "host", "a DNS name"),
        ({"host": "logs.example.com."}, "host", "a DNS name"),
        ({"host": "-logs.example.com"}, "host", "does not start with '-'"),
        ({"host": "logs-.example.com"}, "host", "a DNS name"),
        ({"host": "logs_1.example.com"}, "host", "a DNS name"),
        ({"host": "*.example.com"}, "host", "a DNS name"),  # rsyslog: a wildcard peer
        ({"host": "logs.example.com,evil.example"}, "host", "a DNS name"),
        ({"host": 'logs"x'}, "host", "a DNS name"),
        ({"host": "${HOSTNAME}"}, "host", "a DNS name"),
        ({"host": "192.0.2.300"}, "host", "a DNS name"),  # not an address, not a name
        ({"host": "2001:db8::zz"}, "host", "a DNS name"),
        ({"host": "a" * 64 + ".example.com"}, "host", "a DNS name"),
        ({"host": "l\u043egs.example.com"}, "host", "non-ASCII"),  # Cyrillic o
        ({"host": ""}, "host", "a DNS name"),
        ({"port": 0}, "port", "greater than or equal to 1"),
        ({"port": 65536}, "port", "less than or equal to 65535"),
        ({"port": "6514"}, "port", "integer"),
        ({"queue_max_mb": 0}, "queue_max_mb", "greater than or equal to 16"),
        ({"queue_max_mb": 16385}, "queue_max_mb", "less than or equal to 16384"),
        ({"queue_max_mb": True}, "queue_max_mb", "integer"),
        ({"ca_file": "logs-ca.pem"}, "ca_file", "a path on the controller"),
        ({"ca_file": "/etc/../root/key.pem"}, "ca_file", "leaves its directory"),
        ({"ca_file": "/etc/ca.pem; id"}, "ca_file", "a path on the controller"),
        ({"ca_pem": "x"}, "ca_pem", "allowed: ca_file, host, port, queue_max_mb"),
    ],
)
def test_bad_values_are_refused_naming_the_key(data: dict[str, Any], key: str, allowed: str):
    said = refused({**GOOD, **data})
    assert f"hardening.remote_logs.{key}" in said, said
    assert allowed in said, said
    assert "Traceback" not in said


@pytest.mark.parametrize("missing", ["host", "ca_file"])
def test_host_and_ca_are_required(missing: str) -> None:
    said = refused({k: v for k, v in GOOD.items() if k != missing})
    assert f"hardening.remote_logs.{missing}" in said and "required" in said.lower(), said


# --- the CA file, read when the deploy starts ----------------------------------------------------


def test_a_ca_file_comes_back_as_its_certificates_only(
    tmp_path: Path, ca: tuple[x509.Certificate, Any]
) -> None:
    other, _ = make_cert("second CA")  # no key usage at all: a CA all the same
    path = tmp_path / "bundle.pem"
    path.write_text(f"Site CA bundle\n{pem(ca[0])}\n# the old one\n{pem(other)}")
    assert hardening.remote_logs_ca(HOST, str(path)) == pem(ca[0]) + pem(other)


def _ca_refusal(tmp_path: Path, content: bytes | None, name: str = "ca.pem") -> str:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(hardening.RemoteLogsCaError) as exc:
        hardening.remote_logs_ca(HOST, str(path))
    said = str(exc.value)
    assert said.startswith(f"host {HOST}: hardening.remote_logs.ca_file: {path}: "), said
    assert said.endswith(
        "(allowed: a PEM file of at most 1 MiB holding only CA certificates: basicConstraints "
        "CA:TRUE, valid now)"
    ), said
    return said


def test_a_server_certificate_is_not_a_ca(tmp_path: Path, ca: tuple[Any, Any]) -> None:
    leaf, _ = make_cert("logs.example.com", ca=False, issuer=ca, dns=("logs.example.com",))
    said = _ca_refusal(tmp_path, pem(leaf).encode())
    assert "certificate 1 (CN=logs.example.com) is not a CA certificate" in said


def test_a_bundle_with_one_leaf_is_refused(tmp_path: Path, ca: tuple[Any, Any]) -> None:
    leaf, _ = make_cert("logs.example.com", ca=None, issuer=ca)  # no basicConstraints: v1-like
    said = _ca_refusal(tmp_path, (pem(ca[0]) + pem(leaf)).encode())
    assert "certificate 2 (CN=logs.example.com) is not a CA certificate" in said


def test_a_ca_that_may_not_sign_certificates_is_refused(tmp_path: Path) -> None:
    cert, _ = make_cert("signing-less CA", key_usage=False)
    said = _ca_refusal(tmp_path, pem(cert).encode())
    assert "may not sign certificates (its key usage lacks keyCertSign)" in said


@pytest.mark.parametrize(
    ("days", "says"), [((-30, -1), "expired on "), ((1, 30), "is not valid before ")]
)
def test_a_ca_outside_its_validity_is_refused(
    tmp_path: Path, days: tuple[int, int], says: str
) -> None:
    cert, _ = make_cert("old CA", days=days)
    assert says in _ca_refusal(tmp_path, pem(cert).encode())


def test_a_private_key_in_the_file_is_refused_and_never_echoed(
    tmp_path: Path, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
) -> None:
    key = key_pem(ca[1])
    said = _ca_refusal(tmp_path, (pem(ca[0]) + key).encode())
    assert "it holds PRIVATE KEY block(s), which are never uploaded" in said
    body = "".join(key.splitlines()[1:-1])
    assert not any(chunk in said for chunk in re.findall(".{16}", body))


def _ca_reason(tmp_path: Path, content: bytes | None) -> str:
    """The reason alone, between the message's host/key/file and its allowed clause."""
    said = _ca_refusal(tmp_path, content)
    head = f"host {HOST}: hardening.remote_logs.ca_file: {tmp_path / 'ca.pem'}: "
    return said.removeprefix(head).split(" (allowed: ")[0]


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "no such file or directory"),
        (b"", "the file is empty"),
        (b" \n\t\n", "the file is empty"),
        (b"not a certificate\n", "no PEM certificate in it"),
        (
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "a certificate in it cannot be parsed",
        ),
        (
            "-----BEGIN CERTIFICATE-----\n\u00e9\n".encode(),
            "not a PEM file (it holds non-ASCII bytes)",
        ),
        (b"x" * ((1 << 20) + 1), "larger than 1 MiB"),
        (b"x" * (1 << 20), "no PEM certificate in it"),  # 1 MiB exactly is not too large
    ],
)
def test_what_is_not_a_pem_file_is_refused(
    tmp_path: Path, content: bytes | None, says: str
) -> None:
    assert _ca_reason(tmp_path, content) == says


def test_an_unreadable_ca_file_says_why_in_the_systems_words(tmp_path: Path) -> None:
    """The reason is the system's own words (strerror, lowercased): here a path through a
    regular file (ENOTDIR; file modes do not stop root, who runs the tests in CI)."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(hardening.RemoteLogsCaError) as exc:
        hardening.remote_logs_ca(HOST, str(tmp_path / "file" / "ca.pem"))
    assert f"{tmp_path / 'file' / 'ca.pem'}: not a directory (allowed: " in str(exc.value)


def test_a_ca_file_that_opens_but_cannot_be_read_says_why_in_the_systems_words() -> None:
    """A read error after the file opened is reported the same way: /proc/self/mem is a
    regular file that opens, and reading it from offset 0 fails with EIO."""
    with pytest.raises(hardening.RemoteLogsCaError) as exc:
        hardening.remote_logs_ca(HOST, "/proc/self/mem")
    assert "/proc/self/mem: input/output error (allowed: " in str(exc.value)


def test_a_certificate_without_a_subject_is_named_by_its_place(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    assert _ca_reason(tmp_path, pem(cert).encode()) == (
        "certificate 1 ((no subject)) is not a CA certificate (its basicConstraints lack CA:TRUE)"
    )


def test_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").mkdir()
    assert "not a regular file" in _ca_refusal(tmp_path, None)


# --- RainerScript strings, read back by the real rsyslogd ----------------------------------------


@pytest.mark.parametrize(
    ("value", "rendered"),
    [
        ("logs.example.com", '"logs.example.com"'),
        (6514, '"6514"'),
        ('a"b', '"a\\"b"'),
        ("a\\b", '"a\\\\b"'),
        ("$HOME", '"\\$HOME"'),
        ("a\\", '"a\\\\"'),
    ],
)
def test_rainerscript_string_escapes(value: Any, rendered: str) -> None:
    assert rainerscript_string(value) == rendered


@pytest.mark.parametrize("value", ["a\nb", "a\rb", "a\x00b", "a\x1bb", "a\u2028b", "caf\u00e9"])
def test_rainerscript_string_refuses_what_it_must_not_write(value: str) -> None:
    with pytest.raises(ConfigError) as exc:
        rainerscript_string(value, "hardening.remote_logs.host")
    assert str(exc.value).startswith("hardening.remote_logs.host: ")
    assert "allowed: printable" in str(exc.value)


def rsyslogd() -> str:
    for found in (shutil.which("rsyslogd"), "/usr/sbin/rsyslogd"):
        if found and Path(found).exists():
            return found
    if os.environ.get("CI") == "true":
        pytest.fail("rsyslogd is needed (apt-get install rsyslog rsyslog-gnutls: make deps)")
    pytest.skip("rsyslogd is not installed (apt-get install rsyslog rsyslog-gnutls)")


HOSTILE = [
    'a"b',
    "a\\b",
    "$HOME",
    "${HOME}",
    "`echo x`",
    "#not a comment",
    "it's",
    "%msg%",
    "a\\nb",
    "\\x41\\101",
    "a\\",
    '\\"',
    "$!v",
    "x*y?z",
    ') action(type="omfile" file="/tmp/gpunode-pwned")',
]


def test_rsyslog_reads_every_hostile_string_back_exactly(tmp_path: Path) -> None:
    """rsyslogd itself (in the foreground, on its own start-up message) sets a variable to each
    rendered string and writes it out: what comes back is the value, byte for byte, and no
    string closed its own quote (the last one would otherwise add a file action)."""
    binary = rsyslogd()
    out = tmp_path / "out"
    lines = [
        f'global(workDirectory={rainerscript_string(str(tmp_path))} processInternalMessages="on")',
        'template(name="value" type="list") { property(name="$!v") constant(value="\\n") }',
        'if $syslogtag startswith "rsyslogd" then {',
    ]
    for value in HOSTILE:
        lines += [
            f"  set $!v = {rainerscript_string(value)};",
            f'  action(type="omfile" file={rainerscript_string(str(out))} template="value")',
        ]
    conf = tmp_path / "read-back.conf"
    conf.write_text("\n".join([*lines, "}", ""]))
    proc = subprocess.Popen(
        [binary, "-n", "-f", str(conf), "-i", str(tmp_path / "pid")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (
            not out.exists() or len(out.read_text().splitlines()) < len(HOSTILE)
        ):
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert out.read_text().splitlines()[: len(HOSTILE)] == HOSTILE, err
    assert not Path("/tmp/gpunode-pwned").exists()


# --- the rendered drop-in ------------------------------------------------------------------------


def rendered(distro: str = "debian12", **logs: Any) -> str:
    cfg = load_one({**GOOD, **logs}, distro)
    return hardening.render_remote_logs(cfg, "apt" if distro in APT else "dnf")


def action(text: str) -> dict[str, str]:
    """The drop-in's one action, parameter -> value (the values are plain: no escapes)."""
    (body,) = re.findall(r"^action\((.*?)^\)", text, re.M | re.S)
    return dict(re.findall(r'^\s*([A-Za-z_.]+)="([^"\\]*)"\s*$', body, re.M))


@pytest.mark.parametrize("distro", ALL)
def test_the_drop_in_forwards_everything_over_tls_to_the_pinned_name(distro: str) -> None:
    params = action(rendered(distro, host="Logs.Example.com", port=10514, queue_max_mb=64))
    spool = "/var/spool/rsyslog" if distro in APT else "/var/lib/rsyslog"
    assert params == {
        "type": "omfwd",
        "name": "gpunode-remote-logs",
        "target": "logs.example.com",
        "port": "10514",
        "protocol": "tcp",
        "template": "RSYSLOG_SyslogProtocol23Format",
        "TCP_Framing": "octet-counted",
        "StreamDriver": "gtls",
        "StreamDriverMode": "1",
        "StreamDriverAuthMode": "x509/name",
        "StreamDriverPermittedPeers": "logs.example.com",
        "StreamDriver.CAFile": hardening.REMOTE_LOGS_CA,
        "StreamDriver.CheckExtendedKeyPurpose": "on",
        "StreamDriver.PermitExpiredCerts": "off",
        "queue.type": "LinkedList",
        "queue.filename": "gpunode-remote-logs",
        "queue.spoolDirectory": spool,
        "queue.maxDiskSpace": str(64 * 1024 * 1024),
        "queue.saveOnShutdown": "on",
        "queue.timeoutEnqueue": "0",
        "action.resumeRetryCount": "-1",
        "action.resumeInterval": "10",
    }
    # one action, nothing else: no filter, no second output, no global() settings
    assert re.findall(r"^\S.*$", rendered(distro), re.M)[-2:] == ["action(", ")"]


@pytest.mark.parametrize(
    ("distro", "host"), [("debian12", "logs.example.com"), ("rocky9", "2001:db8::7")]
)
def test_the_drop_in_passes_rsyslogd_check(distro: str, host: str, tmp_path: Path) -> None:
    binary = rsyslogd()
    conf = tmp_path / "60-gpunode-remote.conf"
    conf.write_text(rendered(distro, host=host))
    proc = subprocess.run(
        [binary, "-N1", "-f", str(conf)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    # the check is real: a misspelt parameter fails it
    conf.write_text(conf.read_text().replace("StreamDriverMode=", "StreamDriverMood="))
    proc = subprocess.run(
        [binary, "-N1", "-f", str(conf)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0 and "StreamDriverMood" in proc.stderr, proc.stderr


# --- forwarding for real, on loopback ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """One rsyslogd in the foreground, its work directory under a tmp folder."""

    def __init__(self, binary: str, conf: Path) -> None:
        self.proc = subprocess.Popen(
            [binary, "-n", "-f", str(conf), "-i", str(conf.with_suffix(".pid"))],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.communicate(timeout=30)[1]
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.communicate()[1]


def _wait_port(port: int, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def _log(port: int, text: str) -> None:
    """One message into the sender, through its plain TCP input (octet-counted, RFC 6587)."""
    frame = f"<13>1 - gpunode-test gpunode-probe - - - {text}".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(str(len(frame)).encode() + b" " + frame)


@pytest.fixture
def pair(tmp_path: Path, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> Iterator[Any]:
    """A receiver (imtcp with TLS, a certificate for the name 127.0.0.1 signed by ``ca``) and a
    factory of senders, each a real rsyslogd running the rendered drop-in (its CA file and
    work directory moved under tmp_path) behind a plain TCP input on loopback."""
    binary = rsyslogd()
    rx = tmp_path / "rx"
    rx.mkdir()
    server, server_key = make_cert("127.0.0.1", ca=False, issuer=ca, dns=("127.0.0.1",))
    (rx / "cert.pem").write_text(pem(server))
    (rx / "key.pem").write_text(key_pem(server_key))
    (rx / "ca.pem").write_text(pem(ca[0]))
    tls_port = _free_port()
    q = rainerscript_string
    (rx / "rx.conf").write_text(
        f"global(workDirectory={q(str(rx))})\n"
        'module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" '
        'StreamDriver.AuthMode="anon")\n'
        f'input(type="imtcp" port={q(tls_port)} address="127.0.0.1" '
        f"streamDriver.CAFile={q(str(rx / 'ca.pem'))} "
        f"streamDriver.CertFile={q(str(rx / 'cert.pem'))} "
        f"streamDriver.KeyFile={q(str(rx / 'key.pem'))})\n"
        f'action(type="omfile" file={q(str(rx / "received.log"))})\n'
    )
    daemons = [Daemon(binary, rx / "rx.conf")]
    _wait_port(tls_port)

    def sender(name: str, ca_pem: str) -> tuple[int, Path, Daemon]:
        tx = tmp_path / name
        tx.mkdir(exist_ok=True)
        (tx / "ca.pem").write_text(ca_pem)
        text = rendered(host="127.0.0.1", port=tls_port, queue_max_mb=16)
        text = text.replace(q(hardening.REMOTE_LOGS_CA), q(str(tx / "ca.pem")))
        text = text.replace(q("/var/spool/rsyslog"), q(str(tx)))
        port = _free_port()
        (tx / "tx.conf").write_text(
            f'module(load="imtcp")\ninput(type="imtcp" port={q(port)} address="127.0.0.1")\n' + text
        )
        daemon = Daemon(binary, tx / "tx.conf")
        daemons.append(daemon)
        _wait_port(port)
        return port, tx, daemon

    yield sender, rx / "received.log"
    for daemon in reversed(daemons):
        daemon.stop()


def _received(path: Path, nonce: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and nonce in path.read_text():
            return True
        time.sleep(0.2)
    return False


def test_the_drop_in_delivers_only_to_the_ca_it_pins_and_keeps_the_rest(
    pair: Any, ca: tuple[x509.Certificate, Any]
) -> None:
    """The rendered action, run by a real rsyslogd: a message reaches the TLS receiver with the
    CA that signed the receiver's certificate. With another CA it is not delivered; it waits
    in the queue, which rsyslog saves to its work directory when it stops, and is delivered
    once rsyslog runs again with the right CA (what a deploy that fixes the CA does)."""
    sender, received = pair
    port, _, _ = sender("right", pem(ca[0]))
    nonce = f"right-{os.urandom(6).hex()}"
    _log(port, nonce)
    assert _received(received, nonce, 20)

    wrong_ca, _ = make_cert("another CA", key_usage=True)
    port, spool, daemon = sender("pinned", pem(wrong_ca))
    kept = f"kept-{os.urandom(6).hex()}"
    _log(port, kept)
    assert not _received(received, kept, 8)
    err = daemon.stop()
    assert "not permitted to talk to peer, certificate invalid: signer not found" in err, err
    assert "queue.saveonshutdown is set, so data will now be spooled to disk" in err, err
    queued = [p for p in spool.iterdir() if p.name.startswith("gpunode-remote-logs.")]
    assert any(kept.encode() in p.read_bytes() for p in queued), (queued, err)

    sender("pinned", pem(ca[0]))  # the same work directory, the right CA
    assert _received(received, kept, 30)


# --- the role, on the fake host ------------------------------------------------------------------

STAGED = "/etc/rsyslog.d/.60-gpunode-remote.conf.gpunode-new"
JOURNALD_DROPIN = (REPO_ROOT / "templates" / "hardening" / "journald-forward.conf").read_text()


def _fixture_lines(name: str) -> list[str]:
    return (FIXTURES / name).read_text().splitlines()


def fresh_responses(distro: str) -> dict[Any, Response]:
    return {
        HostInfo().command(): list(host_info_output(distro, "")),
        FirewallState().command(): _fixture_lines("firewall-state.fresh"),
        SshdState().command(): _fixture_lines("sshd-state.fresh"),
        PrimaryGroup().command("root"): "root",
        WritableSysctls().command(sorted(hardening_schema.SYSCTL_KERNEL)): _fixture_lines(
            "writable-sysctls.controller"
        ),
    }


def running(*units: str) -> Handler:
    """systemctl show for these units: running and enabled (rsyslog's package starts it)."""

    def handler(command: str) -> Response | None:
        m = re.search(r"--property (SubState|UnitFileState) (\S+) \)", command)
        if not m or m[2] not in units:
            return None
        return [f"Id={m[2]}", f"{m[1]}={'running' if m[1] == 'SubState' else 'enabled'}"]

    return handler


UNITS = running("rsyslog.service", "systemd-journald.service")


def role(
    cfg: NodeConfig,
    distro: str,
    handlers: list[Handler] | None = None,
    responses: dict[Any, Response] | None = None,
) -> Any:
    handlers = [*(handlers or []), UNITS]
    return run_deploys(
        cfg,
        {**(responses or {}), **fresh_responses(distro)},
        [hardening_role],
        handlers,
        host_name=HOST,
    )


def on(ca_file: Path, distro: str = "debian12", **logs: Any) -> NodeConfig:
    return load_one({"host": "logs.example.com", "ca_file": str(ca_file), **logs}, distro)


def first(run: Any, pattern: str) -> int:
    for i, command in enumerate(run.commands):
        if re.search(pattern, command):
            return i
    raise AssertionError(f"no command matches {pattern!r}:\n" + "\n".join(run.commands))


@pytest.mark.parametrize("distro", ALL)
def test_a_fresh_host_gets_rsyslog_the_ca_and_the_checked_drop_in(
    distro: str, ca_file: Path
) -> None:
    cfg = on(ca_file, distro)
    family = "apt" if distro in APT else "dnf"
    run = role(cfg, distro)
    assert not run.failed
    (install,) = run.grep(r"install.* rsyslog ")
    if distro in APT:
        assert "--no-install-recommends" in install
        assert install.endswith(" rsyslog rsyslog-gnutls logrotate"), install
    else:
        assert re.fullmatch(r"dnf install -y rsyslog rsyslog-gnutls", install), install
    # the CA: what the controller's file holds as certificates, root 0644
    assert run.files[hardening.REMOTE_LOGS_CA] == ca_file.read_text()
    assert run.grep(rf"^chown root:root {re.escape(hardening.REMOTE_LOGS_CA)}$")
    assert run.grep(rf"^chmod 644 {re.escape(hardening.REMOTE_LOGS_CA)}$")
    # the drop-in: staged root 0644 before its content, checked alone, moved, checked whole
    assert run.files[STAGED] == hardening.render_remote_logs(cfg, family)
    staged = first(run, rf"^install -m 644 -o root -g root /dev/null {re.escape(STAGED)}$")
    (script,) = run.grep(r"rsyslogd -N1 -f ")
    steps = script.splitlines()
    assert steps[0] == f"if ! out=$(/usr/sbin/rsyslogd -N1 -f {STAGED} 2>&1); then"
    assert steps.index(f"mv -f {STAGED} {hardening.REMOTE_LOGS_CONF}") < steps.index(
        "if ! out=$(/usr/sbin/rsyslogd -N1 2>&1); then"
    )
    check = run.commands.index(script)
    restart = first(run, r"^systemctl restart rsyslog\.service$")
    assert first(run, r"install.* rsyslog ") < staged < check < restart
    assert first(run, rf"^chmod 644 {re.escape(hardening.REMOTE_LOGS_CA)}$") < restart
    assert not run.grep(r"^systemctl (start|enable) rsyslog\.service$")  # running already
    # the journal's way into rsyslog: journald's forwarding on Debian/Ubuntu, imjournal on EL9
    if distro in APT:
        assert run.files[hardening.REMOTE_LOGS_JOURNALD] == JOURNALD_DROPIN
        assert "ForwardToSyslog=yes" in run.files[hardening.REMOTE_LOGS_JOURNALD].splitlines()
        assert run.grep(r"^systemctl restart systemd-journald\.service$")
    else:
        assert hardening.REMOTE_LOGS_JOURNALD not in run.files
        assert not run.grep(r"systemd-journald")


def converged_remote_logs(cfg: NodeConfig, ca_pem: str) -> tuple[Handler, dict[Any, Response]]:
    """A Debian 12 host a deploy of ``cfg`` left: the packages installed, the CA and the
    journald drop-in in place, the rsyslog drop-in with the wanted digest, root 0644."""
    dropin = hardening.render_remote_logs(cfg, "apt")
    on_host = {hardening.REMOTE_LOGS_CA: ca_pem, hardening.REMOTE_LOGS_JOURNALD: JOURNALD_DROPIN}
    digest = hashlib.sha256(dropin.encode()).hexdigest()
    packages = hardening.remote_logs_packages("apt")
    return converged(on_host, dict.fromkeys(on_host, "644")), {
        RsyslogDropin().command(hardening.REMOTE_LOGS_CONF): [
            "root root 644",
            f"{digest}  {hardening.REMOTE_LOGS_CONF}",
        ],
        re.compile(r"\( dpkg -l \)"): [f"ii  {p} 1.0-1 amd64 -" for p in packages],
    }


REMOTE_LOGS_COMMANDS = r"rsyslog|journald|remote-logs|ForwardToSyslog"
FACT_COMMANDS = r"^(! \(test -e|test -[ef] |if command)"  # what pyinfra reads, not changes


def test_a_converged_host_changes_nothing_and_restarts_nothing(ca_file: Path) -> None:
    cfg = on(ca_file)
    handler, responses = converged_remote_logs(cfg, ca_file.read_text())
    run = role(cfg, "debian12", [handler], responses)
    assert not run.failed
    uploads = [path for path, _ in run.uploads]
    assert not any(re.search(REMOTE_LOGS_COMMANDS, path) for path in uploads), uploads
    changing = [
        c
        for c in run.commands
        if re.search(REMOTE_LOGS_COMMANDS, c) and not re.search(FACT_COMMANDS, c)
    ]
    assert changing == [], changing  # facts only: no install, no check, no restart


@pytest.mark.parametrize(
    ("what", "drift"),
    [
        ("the drop-in", {"dropin": "0" * 64}),
        ("the CA", {"ca": "another CA\n"}),
    ],
)
def test_a_changed_drop_in_or_ca_is_put_back_and_rsyslog_restarted(
    ca_file: Path, what: str, drift: dict[str, str]
) -> None:
    cfg = on(ca_file)
    handler, responses = converged_remote_logs(cfg, drift.get("ca", ca_file.read_text()))
    if "dropin" in drift:
        responses[RsyslogDropin().command(hardening.REMOTE_LOGS_CONF)] = [
            "root root 644",
            f"{drift['dropin']}  {hardening.REMOTE_LOGS_CONF}",
        ]
    run = role(cfg, "debian12", [handler], responses)
    assert not run.failed
    assert len(run.grep(r"^systemctl restart rsyslog\.service$")) == 1, what
    assert (STAGED in run.files) == ("dropin" in drift)
    assert (hardening.REMOTE_LOGS_CA in run.files) == ("ca" in drift)
    assert not run.grep(r"install.* rsyslog |systemd-journald\.service$")


def test_a_ca_file_that_is_no_ca_stops_the_run_before_any_change(
    tmp_path: Path, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
) -> None:
    leaf, _ = make_cert("logs.example.com", ca=False, issuer=ca, dns=("logs.example.com",))
    bad = tmp_path / "leaf.pem"
    bad.write_text(pem(leaf))
    seen: list[str] = []

    def record(command: str) -> None:
        seen.append(command)
        return None

    with pytest.raises(hardening.RemoteLogsCaError) as exc:
        role(on(bad), "debian12", [record])
    assert str(exc.value).startswith(
        f"host @fake/{HOST}: hardening.remote_logs.ca_file: {bad}: certificate 1 "
        "(CN=logs.example.com) is not a CA certificate"
    )
    # pyinfra had only gathered facts: nothing was installed, written or restarted
    assert seen and not [
        c for c in seen if re.search(r"install|apt-get|mv |rm |systemctl (re)?start", c)
    ]


def test_turned_off_gpunodes_files_go_and_rsyslog_restarts_without_them(ca_file: Path) -> None:
    cfg = load_one(None)
    had = on(ca_file)
    handler, responses = converged_remote_logs(had, ca_file.read_text())
    live = {hardening.REMOTE_LOGS_CONF: hardening.render_remote_logs(had, "apt")}
    run = role(cfg, "debian12", [handler, converged(live, {})], responses)
    assert not run.failed
    for path in (
        hardening.REMOTE_LOGS_CONF,
        hardening.REMOTE_LOGS_CA,
        hardening.REMOTE_LOGS_JOURNALD,
    ):
        assert run.grep(rf"^rm -f {re.escape(path)}$"), path
    (restart,) = run.grep(r"systemctl try-restart rsyslog\.service")
    assert restart.endswith("rm -f /var/spool/rsyslog/gpunode-remote-logs.*")
    assert run.commands.index(restart) > first(
        run, rf"^rm -f {re.escape(hardening.REMOTE_LOGS_CONF)}$"
    )
    assert run.grep(r"^systemctl restart systemd-journald\.service$")
    assert not run.grep(r"install.* rsyslog|apt-get.* remove|rsyslogd -N1")  # rsyslog stays


def test_never_on_nothing_of_it_is_touched() -> None:
    run = role(load_one(None), "debian12")
    assert not run.failed
    facts = FACT_COMMANDS
    assert [
        c for c in run.commands if re.search(REMOTE_LOGS_COMMANDS, c) and not re.search(facts, c)
    ] == []


# --- the install script, under a real sh with the real rsyslogd ----------------------------------


@pytest.mark.parametrize("before", [None, "# the previous drop-in\n"])
def test_a_drop_in_rsyslogd_refuses_is_never_put_in_place(
    tmp_path: Path, before: str | None
) -> None:
    binary = rsyslogd()
    assert binary == "/usr/sbin/rsyslogd"  # the path the script calls
    dest, staged = (
        tmp_path / "60-gpunode-remote.conf",
        tmp_path / ".60-gpunode-remote.conf.gpunode-new",
    )
    if before is not None:
        dest.write_text(before)
    staged.write_text(rendered().replace("StreamDriverMode=", "StreamDriverMood="))
    out = run_sh(install_command(str(staged), str(dest)))
    assert not out["success"]
    assert "parameter 'StreamDriverMood' not known" in out["stderr"], out
    assert f"gpunode: rsyslogd -N1 refused the new {dest}: it was not put in place" in out["stderr"]
    assert not staged.exists()
    assert (dest.read_text() if dest.exists() else None) == before


def test_a_drop_in_rsyslogd_accepts_goes_in_place(tmp_path: Path) -> None:
    rsyslogd()
    dest, staged = (
        tmp_path / "60-gpunode-remote.conf",
        tmp_path / ".60-gpunode-remote.conf.gpunode-new",
    )
    dest.write_text("# the previous drop-in\n")
    staged.write_text(rendered())
    out = run_sh(install_command(str(staged), str(dest)))
    assert out["success"], out
    assert dest.read_text() == rendered() and not staged.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["60-gpunode-remote.conf"]


# --- the firewall's egress allow-list lets the forwarding out ------------------------------------


def _egress(remote_logs: dict[str, Any] | None, **base: Any) -> dict[str, Any]:
    return {
        "distro": "debian12",
        "network": NETWORK,
        "base": base or {"apt_proxy": "http://192.0.2.80:3128", "ntp_servers": ["192.0.2.123"]},
        "firewall": {
            "egress": {"enabled": True, "addresses": {"logs.example.com": ["192.0.2.0/29"]}}
        },
        "hardening": {"remote_logs": remote_logs},
    }


def _load(defaults: dict[str, Any]) -> NodeConfig:
    raw = {"defaults": defaults, "hosts": {HOST: {"connection": {"address": "127.0.0.2"}}}}
    return load(raw, source="test_remote_logs").hosts[HOST].config


@pytest.mark.parametrize(
    ("host", "port", "rule"),
    [
        ("192.0.2.5", 6514, "ip daddr { 192.0.2.5/32 } tcp dport { 6514 }"),
        ("2001:db8::5", 10514, "ip6 daddr { 2001:db8::5/128 } tcp dport { 10514 }"),
        ("logs.example.com", 6514, "ip daddr { 192.0.2.0/29 } tcp dport { 6514 }"),
    ],
)
def test_with_egress_on_the_log_host_is_reachable(host: str, port: int, rule: str) -> None:
    cfg = _load(_egress({**GOOD, "host": host, "port": port}))
    ruleset = firewall_rules.render_ruleset(cfg, 22)
    assert f'{rule} accept comment "hardening.remote_logs.host"' in ruleset
    off = firewall_rules.render_ruleset(_load(_egress(None)), 22)
    assert "hardening.remote_logs" not in off


def test_a_log_host_name_without_addresses_is_refused_with_egress_on() -> None:
    data = _egress({**GOOD, "host": "elsewhere.example.com"})
    with pytest.raises(ConfigError) as exc:
        _load(data)
    assert (
        "firewall.egress.addresses: elsewhere.example.com (hardening.remote_logs.host) is a DNS "
        "name"
    ) in str(exc.value)


def test_the_log_host_does_not_stand_for_a_package_source() -> None:
    data = _egress({**GOOD, "host": "192.0.2.5"}, ntp_servers=["192.0.2.123"])
    with pytest.raises(ConfigError) as exc:
        _load(data)
    assert "the node would fetch packages from its distro's default mirrors" in str(exc.value)


# --- the drift seal sees a new CA in the same file -----------------------------------------------


def test_a_new_ca_in_the_same_file_is_a_new_plan_for_the_seal(
    tmp_path: Path, ca_file: Path
) -> None:
    """gpunode's drift seal skips the plan while its inputs are the same: the CA file's content
    is one of them (the inventory names only its path)."""
    cfg = on(ca_file)

    def digest() -> str:
        (host,) = list(inventory_from([(HOST, {"gpunode": cfg})]))
        return seal.input_digest(host)

    before = digest()
    assert digest() == before
    ca_file.write_text(pem(make_cert("rotated CA")[0]))
    rotated = digest()
    assert rotated != before
    ca_file.unlink()
    assert digest() not in (before, rotated)
    (off,) = list(inventory_from([(HOST, {"gpunode": load_one(None)})]))
    assert seal.controller_files(off) == {}


# --- what the full mutation run of 2026-12-05 found untested ------------------------------------


def test_the_renderer_refuses_a_host_the_schema_was_bypassed_for() -> None:
    """The renderer escapes on its own: a host name with a newline (which the schema refuses
    at load) reaching it some other way is refused naming the key, never written."""
    cfg = load_one(GOOD)
    logs = cfg.hardening.remote_logs
    assert logs is not None
    bad = logs.model_copy(update={"host": 'logs.example.com\naction(type="omprog")'})
    cfg = cfg.model_copy(
        update={"hardening": cfg.hardening.model_copy(update={"remote_logs": bad})}
    )
    with pytest.raises(ConfigError) as err:
        hardening.render_remote_logs(cfg, "apt")
    assert str(err.value).startswith("hardening.remote_logs.host: ")


def test_rendering_without_remote_logs_is_a_programming_error_said_plainly() -> None:
    cfg = load_one(None)
    with pytest.raises(ValueError, match=r"^hardening\.remote_logs is null: nothing to render$"):
        hardening.render_remote_logs(cfg, "apt")


def test_a_fifo_as_the_ca_file_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    """Opened without blocking: a FIFO (no writer ever comes) is refused at once; a blocking
    open would wait forever (an alarm fails the test instead)."""
    fifo = tmp_path / "ca.pem"
    os.mkfifo(fifo, 0o600)

    def hung(signum: int, frame: Any) -> None:
        raise AssertionError("the CA file was opened blocking")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        assert _ca_reason(tmp_path, None) == "not a regular file"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_every_kind_of_other_block_is_named(
    tmp_path: Path, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
) -> None:
    extra = "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"
    said = _ca_reason(tmp_path, (pem(ca[0]) + key_pem(ca[1]) + extra).encode())
    assert said == "it holds PRIVATE KEY, X509 CRL block(s), which are never uploaded"


def test_a_long_subject_is_cut_at_120_characters(tmp_path: Path) -> None:
    cert, _ = make_cert("c" * 64, ca=False)
    subject = f"CN={'c' * 64}"
    assert _ca_reason(tmp_path, pem(cert).encode()) == (
        f"certificate 1 ({subject}) is not a CA certificate (its basicConstraints lack CA:TRUE)"
    )
    # one CN is at most 64 characters: a longer subject has more parts
    name = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "o" * 64)]
        + [x509.NameAttribute(NameOID.COMMON_NAME, "d" * 64)]
    )
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    wide = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    shown = wide.subject.rfc4514_string()
    assert len(shown) > 121
    assert _ca_reason(tmp_path, pem(wide).encode()) == (
        f"certificate 1 ({shown[:120]}) is not a CA certificate (its basicConstraints lack CA:TRUE)"
    )


def test_a_ca_is_valid_at_both_ends_of_its_validity(
    tmp_path: Path, ca: tuple[x509.Certificate, Any]
) -> None:
    path = tmp_path / "ca.pem"
    path.write_text(pem(ca[0]))
    start, end = ca[0].not_valid_before_utc, ca[0].not_valid_after_utc
    for moment in (start, end):
        assert hardening.remote_logs_ca(HOST, str(path), now=moment) == pem(ca[0])
    before = start - timedelta(seconds=1)
    with pytest.raises(hardening.RemoteLogsCaError, match="is not valid before"):
        hardening.remote_logs_ca(HOST, str(path), now=before)
    with pytest.raises(hardening.RemoteLogsCaError, match="expired on"):
        hardening.remote_logs_ca(HOST, str(path), now=end + timedelta(seconds=1))
