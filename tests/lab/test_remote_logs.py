"""Remote logs (``hardening.remote_logs``) on real lab hosts: the journal of a node reaches a
central log host over TLS, pinned to one CA, and waits in the queue while it cannot.

lab-01 is the central log host, set up here as a site would (not by gpunode): rsyslog with
imtcp on 6514 over TLS (GnuTLS), its certificate for ``logs.gpunode.test`` signed by a CA this
test makes with ``cryptography``; its firewall (gpunode's, converged with the rest) opens 6514
to lab-02 only, through ``firewall.extra_input`` in this test's data. lab-02 is the node:
``hardening.remote_logs`` names the log host (its /etc/hosts maps the name to lab-01, as a
site's DNS would) and the CA file on this machine. Messages are written on lab-02 with
``logger`` (syslog socket -> journald) and ``systemd-cat`` (the journal's own stream), each
with a random nonce, and looked for in the file the receiver writes.
"""

from __future__ import annotations

import copy
import secrets
import shlex
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gpunode import hardening
from gpunode.config import read_yaml
from gpunode.paths import REPO_ROOT

from .conftest import Lab, changes, host_checks, planned_changes, pyinfra

INVENTORY = "inventories/lab.py"
DEPLOY = "tests/lab/hardening_deploy.py"
LOG_HOST = "logs.gpunode.test"
RECEIVED = "/var/log/gpunode-received.log"
RECEIVER_DIR = "/etc/gpunode-test-receiver"
DELIVERY_BOUND = 60  # seconds: rsyslog retries a suspended action every 10 s at first


def _cert(
    cn: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A CA (no ``issuer``) or a server certificate for ``cn`` signed by ``issuer``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), True)
    )
    if issuer:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(cn)]), False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256()), key


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _data(lab: Lab, tmp: Path, name: str, remote_logs: dict[str, Any] | None) -> dict[str, str]:
    """inventories/lab.yml, with lab-01's firewall open to lab-02 on 6514 (the receiver is
    a fixture of this test) and lab-02's remote_logs."""
    doc = copy.deepcopy(read_yaml(REPO_ROOT / "inventories" / "lab.yml"))
    lab02 = f"{lab.address('lab-02')}/32"
    doc["hosts"] = {
        "lab-01": {
            "data": {
                "firewall": {
                    "extra_input": [{"name": "test-log-host", "port": 6514, "cidrs": [lab02]}]
                }
            }
        },
        "lab-02": {"data": {"hardening": {"remote_logs": remote_logs}}},
    }
    path = tmp / f"{name}.yml"
    path.write_text(yaml.safe_dump(doc))
    return {**lab.env, "GPUNODE_LAB_DATA": str(path)}


def _receiver_config(port: int) -> str:
    d = RECEIVER_DIR
    return (
        "# gpunode lab test: the central log host (a site's, not gpunode's)\n"
        'module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" '
        'StreamDriver.AuthMode="anon")\n'
        f'input(type="imtcp" port="{port}" ruleset="remote" '
        f'streamDriver.CAFile="{d}/ca.pem" streamDriver.CertFile="{d}/cert.pem" '
        f'streamDriver.KeyFile="{d}/key.pem")\n'
        f'ruleset(name="remote") {{ action(type="omfile" file="{RECEIVED}") }}\n'
    )


def _write(lab: Lab, host: str, path: str, text: str, mode: str = "644") -> None:
    lab.ssh(
        host,
        f"install -m {mode} /dev/null {shlex.quote(path)} && cat > {shlex.quote(path)}",
        input=text,
        check=True,
    )


def _send(lab: Lab, tag: str) -> str:
    """A message through syslog(3) (logger: /dev/log, journald's socket) and one written to
    the journal's own stream (systemd-cat): both only reach rsyslog from the journal."""
    nonce = f"{tag}-{secrets.token_hex(8)}"
    lab.ssh(
        "lab-02",
        f"logger -t gpunode-probe {nonce}-logger && "
        f"echo {nonce}-journal | systemd-cat -t gpunode-probe",
        check=True,
    )
    return nonce


def _arrived(lab: Lab, nonce: str, seconds: float) -> float | None:
    """Seconds until both of ``nonce``'s messages are in the receiver's file, or None."""
    started = time.monotonic()
    while True:
        out = lab.ssh("lab-01", f"grep -F {nonce}- {RECEIVED} || true").stdout
        if f"{nonce}-logger" in out and f"{nonce}-journal" in out:
            return time.monotonic() - started
        if time.monotonic() - started > seconds:
            return None
        time.sleep(1)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("remote-logs-pki")
    ca = _cert("gpunode lab logs CA")
    other = _cert("another CA")
    return {"tmp": tmp, "ca": ca, "other": other}


@pytest.fixture(scope="module")
def forwarding(lab: Lab, pki: dict[str, Any]) -> dict[str, Any]:
    """Both hosts converged (lab-02 forwarding to lab-01), the receiver up on lab-01."""
    tmp: Path = pki["tmp"]
    ca_file, wrong_ca_file = tmp / "logs-ca.pem", tmp / "wrong-ca.pem"
    ca_file.write_text(_pem(pki["ca"][0]))
    wrong_ca_file.write_text(_pem(pki["other"][0]))
    logs = {"host": LOG_HOST, "ca_file": str(ca_file)}
    env = _data(lab, tmp, "forwarding", logs)
    lab.ssh("lab-02", f"echo '{lab.address('lab-01')} {LOG_HOST}' >> /etc/hosts", check=True)
    started = time.monotonic()
    first = pyinfra(INVENTORY, DEPLOY, env=env, check=True)
    converge_s = time.monotonic() - started
    changed, errors = changes(first.stdout + first.stderr)
    assert errors == 0 and changed > 0
    # the central log host, on lab-01 (apt goes through the lab's proxy, set up by the base role)
    server, server_key = _cert(LOG_HOST, pki["ca"])
    lab.ssh("lab-01", f"install -d -m 700 {RECEIVER_DIR}", check=True)
    _write(lab, "lab-01", f"{RECEIVER_DIR}/ca.pem", _pem(pki["ca"][0]))
    _write(lab, "lab-01", f"{RECEIVER_DIR}/cert.pem", _pem(server))
    key = server_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    _write(lab, "lab-01", f"{RECEIVER_DIR}/key.pem", key, mode="600")
    lab.ssh(
        "lab-01",
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "
        "rsyslog rsyslog-gnutls",
        check=True,
        timeout=600,
    )
    _write(lab, "lab-01", "/etc/rsyslog.d/10-gpunode-test-receiver.conf", _receiver_config(6514))
    lab.ssh("lab-01", "rsyslogd -N1 && systemctl restart rsyslog", check=True)
    lab.ssh(
        "lab-01",
        "for i in $(seq 50); do ss -Hltn 'sport = :6514' | grep -q . && exit 0; sleep .2; done; "
        "exit 1",
        check=True,
    )
    # the site took its receiver in on purpose: AIDE's database on lab-01 takes it in too
    # (the host checks below run AIDE's check there), the way a gpunode deploy does its own
    lab.ssh("lab-01", hardening.aide_update_command("apt"), check=True)
    return {
        "env": env,
        "logs": logs,
        "ca_file": ca_file,
        "wrong_ca_file": wrong_ca_file,
        "tmp": tmp,
        "converge_s": converge_s,
    }


def test_the_journal_reaches_the_log_host_over_tls(lab: Lab, forwarding: dict[str, Any]) -> None:
    nonce = _send(lab, "first")
    took = _arrived(lab, nonce, DELIVERY_BOUND)
    assert took is not None, "the node's messages did not reach the log host"
    print(f"\nfirst converge {forwarding['converge_s']:.0f} s; delivered after {took:.1f} s")
    line = lab.ssh("lab-01", f"grep -F {nonce}-journal {RECEIVED}", check=True).stdout
    assert " lab-02 gpunode-probe" in line, line  # the node's name and the tag came along
    # it came over TLS: the receiver's only input is the TLS one, and the node holds a
    # connection to it from its rsyslog
    conns = lab.ssh("lab-02", "ss -Htnp state established 'dport = :6514'", check=True).stdout
    assert f"{lab.address('lab-01')}:6514" in conns and "rsyslogd" in conns, conns


def test_a_second_run_changes_nothing(lab: Lab, forwarding: dict[str, Any]) -> None:
    second = pyinfra(INVENTORY, DEPLOY, env=forwarding["env"], check=True)
    assert changes(second.stdout + second.stderr) == (0, 0)
    assert planned_changes(INVENTORY, DEPLOY, forwarding["env"]) == {}


@pytest.mark.parametrize("name", ["lab-02", "lab-01"])  # forwarding; not configured
def test_the_host_checks_pass(lab: Lab, forwarding: dict[str, Any], name: str) -> None:
    """tests/host/test_hardening.py as `gpunode verify` runs it: every hardening check, the
    remote logs' among them, on the node that forwards and on the one that does not."""
    host_checks(lab, name, "test_hardening.py", forwarding["env"], INVENTORY)


def test_messages_wait_while_the_log_host_is_down(lab: Lab, forwarding: dict[str, Any]) -> None:
    lab.ssh("lab-01", "systemctl stop syslog.socket rsyslog.service", check=True)
    try:
        nonce = _send(lab, "outage")
        time.sleep(5)
        assert lab.ssh("lab-01", f"grep -cF {nonce} {RECEIVED}").stdout.strip() == "0"
    finally:
        lab.ssh("lab-01", "systemctl start rsyslog.service", check=True)
    assert _arrived(lab, nonce, DELIVERY_BOUND + 30) is not None


def test_a_node_pinned_to_another_ca_does_not_deliver_and_keeps_its_messages(
    lab: Lab, forwarding: dict[str, Any]
) -> None:
    """The CA pin: with the CA of ``ca_file`` changed to one that did not sign the log host's
    certificate, nothing reaches it (rsyslog names the refused certificate); the messages stay
    queued and arrive once the right CA is deployed again (rsyslog saved its queue to disk when
    the deploy restarted it)."""
    tmp: Path = forwarding["tmp"]
    wrong = _data(
        lab, tmp, "wrong-ca", {**forwarding["logs"], "ca_file": str(forwarding["wrong_ca_file"])}
    )
    proc = pyinfra(INVENTORY, DEPLOY, "--limit", "lab-02", env=wrong, check=True)
    assert changes(proc.stdout + proc.stderr)[0] > 0
    since = lab.ssh("lab-02", "date '+%Y-%m-%d %H:%M:%S'", check=True).stdout.strip()
    nonce = _send(lab, "pinned")
    assert _arrived(lab, nonce, 25) is None, "delivered to a log host the pinned CA did not sign"
    journal = lab.ssh(
        "lab-02", f"journalctl -u rsyslog --since '{since}' --no-pager", check=True
    ).stdout
    refused = "not permitted to talk to peer, certificate invalid: signer not found"
    assert refused in journal, journal[-3000:]
    # the right CA again: the message logged while it was refused arrives, none was lost
    back = pyinfra(INVENTORY, DEPLOY, "--limit", "lab-02", env=forwarding["env"], check=True)
    assert changes(back.stdout + back.stderr)[0] > 0
    assert _arrived(lab, nonce, DELIVERY_BOUND) is not None
    assert planned_changes(INVENTORY, DEPLOY, forwarding["env"]) == {}


def test_turned_off_gpunodes_files_go_and_nothing_more_is_forwarded(
    lab: Lab, forwarding: dict[str, Any]
) -> None:
    off = _data(lab, forwarding["tmp"], "off", None)
    proc = pyinfra(INVENTORY, DEPLOY, "--limit", "lab-02", env=off, check=True)
    assert changes(proc.stdout + proc.stderr)[0] > 0
    gone = lab.ssh(
        "lab-02",
        f"ls {hardening.REMOTE_LOGS_CONF} {hardening.REMOTE_LOGS_CA} "
        f"{hardening.REMOTE_LOGS_JOURNALD} 2>&1; systemctl is-active rsyslog",
    ).stdout
    assert gone.count("No such file or directory") == 3 and gone.endswith("active\n"), gone
    nonce = _send(lab, "off")
    assert _arrived(lab, nonce, 15) is None
    again = pyinfra(INVENTORY, DEPLOY, "--limit", "lab-02", env=off, check=True)
    assert changes(again.stdout + again.stderr) == (0, 0)
