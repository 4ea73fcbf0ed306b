"""The inference front door end to end, on real lab hosts: real HAProxy from Debian, a real
OpenBao PKI issuing the certificate, a real model (llama.cpp on the CPU) behind it.

The lab is `gpunode lab up --front-door` (what `make lab` runs): lab-01 serves the model
behind the gateway, lab-02 is a client on the lab bridge; this machine is the controller.
Each test states what a client sees, from lab-02 or from the controller.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import pytest
import yaml
from cryptography import x509

from gpunode.commands import lab_front_door as door
from gpunode.config import _deep_merge
from gpunode.paths import REPO_ROOT

from .conftest import Hidden, Lab, changes, front_door_lab, gpunode, pyinfra, root_vault, run

INVENTORY = "inventories/lab.py"
DEPLOY = "deploys/gpu_node.py"
CANARY = "purple-elephant-canary-7f3a"
SECOND_KEY = Hidden("second-client-key-" + "x" * 24)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """Fresh hosts with the front door, deployed once."""
    yield from front_door_lab()


# --- helpers ---------------------------------------------------------------------------------


def access(lab: Lab) -> dict[str, str]:
    return json.loads((lab.state_dir / "gateway.json").read_text())


def demo_key(lab: Lab) -> Hidden:
    return Hidden(Path(access(lab)["api_key_file"]).read_text().strip())


def vault(lab: Lab) -> hvac.Client:
    return root_vault(lab)


def put_key(lab: Lab, path: str, value: str) -> None:
    vault(lab).secrets.kv.v2.create_or_update_secret(
        path=path, secret={"api_key": value}, mount_point="secret"
    )


def with_front_door(lab: Lab, tmp_path: Path, data: dict[str, Any]) -> dict[str, str]:
    """inventories/lab.yml with ``data`` merged into the front door group (lab-01)."""
    doc = yaml.safe_load((REPO_ROOT / "inventories" / "lab.yml").read_text())
    doc = _deep_merge(doc, {"groups": {door.GROUP: {"data": data}}})
    path = tmp_path / "lab.yml"
    path.write_text(yaml.safe_dump(doc))
    return {**lab.env, "GPUNODE_LAB_DATA": str(path)}


def deploy(env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = pyinfra(INVENTORY, DEPLOY, env=env, timeout=1800)
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def call(
    lab: Lab,
    path: str,
    key: str | None,
    body: dict[str, Any] | None = None,
    method: str | None = None,
    cert: tuple[Path, Path] | None = None,
) -> tuple[int, dict[str, str], str]:
    """One request from the controller, TLS verified against the Vault CA (``cert``: a
    client certificate and its key)."""
    info = access(lab)
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{info['url']}{path}", data=data, method=method)  # noqa: S310
    req.add_header("Content-Type", "application/json")
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    context = ssl.create_default_context(cafile=info["ca_file"])
    if cert:
        context.load_cert_chain(*cert)
    try:
        with urllib.request.urlopen(req, timeout=120, context=context) as resp:  # noqa: S310
            return resp.status, _lower(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, _lower(exc.headers), exc.read().decode()


def _lower(headers: Any) -> dict[str, str]:
    """Header names lowercased (HAProxy sends them so, HTTP/1.1 ignores their case)."""
    return {k.lower(): v for k, v in headers.items()}


def chat(prompt: str) -> dict[str, Any]:
    return {
        "model": door.SERVED_NAME,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 16,
    }


def served_serial(lab: Lab) -> int:
    """The serial of the certificate the gateway serves right now."""
    info = access(lab)
    host, port = info["url"].removeprefix("https://").split(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only reading it: it may be expired on purpose
    with (
        socket.create_connection((host, int(port)), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der
    return x509.load_der_x509_certificate(der).serial_number


def s_client(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    info = access(lab)
    target = info["url"].removeprefix("https://")
    return run(
        ["openssl", "s_client", "-connect", target, "-CAfile", info["ca_file"], *args],
        input="",
        timeout=30,
    )


# --- what a client sees --------------------------------------------------------------------------


def test_the_model_answers_over_tls_from_the_controller(lab: Lab) -> None:
    status, _, text = call(lab, "/v1/chat/completions", demo_key(lab), chat("Say hello."))
    assert status == 200, text
    assert json.loads(text)["choices"][0]["message"]["content"].strip()
    assert door.ask(lab.settings, "Say hello.").strip()  # what `make lab` ends with


def test_the_model_answers_over_tls_from_another_host(lab: Lab) -> None:
    """lab-02 verifies the gateway's certificate against the Vault CA, by name and address."""
    info = access(lab)
    ca = Path(info["ca_file"]).read_text()
    lab.ssh("lab-02", "cat > /tmp/gateway-ca.pem", input=ca, check=True)
    script = f"""
import json, ssl, sys, urllib.request
req = urllib.request.Request({info["url"] + "/v1/chat/completions"!r},
    data=json.dumps({chat("Say hi.")!r}).encode(),
    headers={{"Authorization": "Bearer " + sys.stdin.readline().strip(),
             "Content-Type": "application/json"}})
ctx = ssl.create_default_context(cafile="/tmp/gateway-ca.pem")
with urllib.request.urlopen(req, timeout=120, context=ctx) as resp:
    print(resp.status, json.loads(resp.read())["choices"][0]["message"]["content"][:40])
"""
    lab.ssh("lab-02", "cat > /tmp/ask.py", input=script, check=True)
    out = lab.ssh("lab-02", "python3 /tmp/ask.py", input=demo_key(lab) + "\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("200 ")


def test_old_tls_versions_and_weak_ciphers_are_refused(lab: Lab) -> None:
    assert s_client(lab, "-tls1_2", "-verify_return_error").returncode == 0
    assert s_client(lab, "-tls1_3", "-verify_return_error").returncode == 0
    for args in (
        ("-tls1", "-cipher", "DEFAULT@SECLEVEL=0"),
        ("-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"),
        ("-tls1_2", "-cipher", "AES128-SHA:DES-CBC3-SHA:RC4-SHA@SECLEVEL=0"),
        ("-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES128-SHA@SECLEVEL=0"),
    ):
        proc = s_client(lab, *args)
        assert proc.returncode != 0, f"{args} was accepted:\n{proc.stdout[-1500:]}"


def test_no_key_and_wrong_key_are_401(lab: Lab) -> None:
    for key in (None, "", "wrong-" + demo_key(lab), demo_key(lab)[:-1]):
        status, headers, _ = call(lab, "/v1/models", key)
        assert status == 401, key
        assert headers.get("www-authenticate", "").startswith("Bearer")
    assert call(lab, "/v1/models", demo_key(lab))[0] == 200


def test_routes_outside_the_list_are_404_and_the_backend_is_unreachable(lab: Lab) -> None:
    key = demo_key(lab)
    for path in ("/tokenize", "/invocations", "/slots", "/props", "/metrics", "/v1/models/x"):
        assert call(lab, path, key, {"content": "x"})[0] == 404, path
    assert call(lab, "/health", None)[0] == 200  # the gateway's own, without a key
    backend = f"{lab.address('lab-01')}:{door.SERVICE_PORT}"
    probe = f"timeout 3 bash -c 'exec 3<>/dev/tcp/{backend.replace(':', '/')}' && echo OPEN"
    assert "OPEN" not in lab.ssh("lab-02", probe).stdout
    assert "OPEN" not in run(["bash", "-c", probe]).stdout
    listening = lab.ssh("lab-01", f"ss -Htln 'sport = :{door.SERVICE_PORT}'", check=True)
    assert listening.stdout.split()[3].startswith("127.0.0.1:"), listening.stdout


def test_over_the_limit_is_429_with_retry_after_and_under_it_200(lab: Lab) -> None:
    key = demo_key(lab)  # the demo client: burst 10 per second
    time.sleep(1.5)
    statuses = []
    retry_after = None
    for _ in range(25):
        status, headers, _ = call(lab, "/v1/models", key)
        statuses.append(status)
        retry_after = retry_after or (headers.get("retry-after") if status == 429 else None)
    assert statuses[:10] == [200] * 10, statuses
    assert 429 in statuses, statuses
    assert retry_after and int(retry_after) >= 1
    time.sleep(2)
    assert call(lab, "/v1/models", key)[0] == 200


def test_revoking_one_client_leaves_the_other_working(lab: Lab, tmp_path: Path) -> None:
    put_key(lab, "gpunode/clients/second", SECOND_KEY)
    second = {"key": {"path": "gpunode/clients/second"}, "rate": 5}
    env = with_front_door(lab, tmp_path, {"gateway": {"clients": {"second": second}}})
    deploy(env)
    assert call(lab, "/v1/models", demo_key(lab))[0] == 200
    assert call(lab, "/v1/models", SECOND_KEY)[0] == 200
    revoked = {"demo": {"revoked": True}, "second": second}
    env = with_front_door(lab, tmp_path, {"gateway": {"clients": revoked}})
    deploy(env)
    assert call(lab, "/v1/models", demo_key(lab))[0] == 401
    assert call(lab, "/v1/models", SECOND_KEY)[0] == 200
    deploy(with_front_door(lab, tmp_path, {}))  # back to the lab's own clients
    assert call(lab, "/v1/models", demo_key(lab))[0] == 200


def test_an_mtls_client_needs_its_certificate_from_the_same_ca(lab: Lab, tmp_path: Path) -> None:
    client = vault(lab)
    client.secrets.pki.create_or_update_role(
        "gpunode-clients",
        extra_params={
            "allow_any_name": True,
            "server_flag": False,
            "client_flag": True,
            "key_type": "ec",
            "key_bits": 256,
            "max_ttl": "24h",
        },
        mount_point=door.PKI_MOUNT,
    )
    issued = client.secrets.pki.generate_certificate(
        "gpunode-clients", "mtls-app", extra_params={"ttl": "1h"}, mount_point=door.PKI_MOUNT
    )["data"]
    cert, key_file = tmp_path / "client.pem", tmp_path / "client.key"
    cert.write_text(issued["certificate"] + "\n")
    key_file.write_text(issued["private_key"] + "\n")
    key_file.chmod(0o600)
    key = Hidden("mtls-app-key-" + "z" * 24)
    put_key(lab, "gpunode/clients/mtls-app", key)
    app = {"key": {"path": "gpunode/clients/mtls-app"}, "mtls": True}
    deploy(with_front_door(lab, tmp_path, {"gateway": {"clients": {"mtls-app": app}}}))
    assert call(lab, "/v1/models", key)[0] == 403  # the key alone is not enough
    assert call(lab, "/v1/models", key, cert=(cert, key_file))[0] == 200
    assert call(lab, "/v1/models", demo_key(lab))[0] == 200  # others need no certificate


def test_bad_pki_settings_stop_the_run_before_anything_is_written(lab: Lab, tmp_path: Path) -> None:
    for tls, says in (
        ({"role": "no-such-role"}, "no-such-role"),
        ({"ttl": "3000h"}, "gateway.tls"),
    ):
        proc = deploy(with_front_door(lab, tmp_path, {"gateway": {"tls": tls}}), check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert says in out, out[-3000:]
        assert "Grand total" not in out  # stopped before any operation ran


def test_certificate_rotation_under_load_drops_no_request(lab: Lab, tmp_path: Path) -> None:
    """A changed TTL renews the certificate while 4 threads call the gateway: the serial
    changes, no request fails."""
    put_key(lab, "gpunode/clients/load", "load-client-key-" + "y" * 24)
    load = {"key": {"path": "gpunode/clients/load"}, "rate": 10000, "concurrent": 64}
    env = with_front_door(lab, tmp_path, {"gateway": {"clients": {"load": load}}})
    deploy(env)
    before = served_serial(lab)
    results: list[int | str] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                results.append(call(lab, "/v1/models", "load-client-key-" + "y" * 24)[0])
            except OSError as exc:
                results.append(repr(exc))

    threads = [threading.Thread(target=loop) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1)
    env = with_front_door(
        lab, tmp_path, {"gateway": {"clients": {"load": load}, "tls": {"ttl": "60s"}}}
    )
    deploy(env)
    time.sleep(1)
    stop.set()
    for t in threads:
        t.join()
    assert len(results) >= 200, len(results)
    failed = [r for r in results if r != 200]
    assert not failed, f"{len(failed)} of {len(results)} failed: {failed[:5]}"
    assert served_serial(lab) != before


def test_an_expired_certificate_is_replaced_by_the_drift_run(lab: Lab, tmp_path: Path) -> None:
    load = {"key": {"path": "gpunode/clients/load"}, "rate": 10000, "concurrent": 64}
    env = with_front_door(
        lab, tmp_path, {"gateway": {"clients": {"load": load}, "tls": {"ttl": "60s"}}}
    )
    deploy(env)  # a 60 s certificate (issued by the test above, or now)
    deadline = time.time() + 75
    while s_client(lab, "-verify_return_error").returncode == 0:
        assert time.time() < deadline, "the 60 s certificate did not expire"
        time.sleep(5)
    expired = served_serial(lab)
    drift = gpunode("drift", INVENTORY, DEPLOY, "--apply", env=env, timeout=900)
    assert drift.returncode == 0, drift.stdout[-3000:] + drift.stderr[-3000:]
    assert "Gateway certificate" in drift.stdout
    assert s_client(lab, "-verify_return_error").returncode == 0
    assert served_serial(lab) != expired


def test_logs_name_client_route_and_status_never_the_prompt_or_key(lab: Lab) -> None:
    deploy({**lab.env})
    status, _, _ = call(lab, "/v1/chat/completions", demo_key(lab), chat(f"Repeat: {CANARY}"))
    assert status == 200
    time.sleep(1)
    journal = lab.ssh("lab-01", "journalctl --no-pager -o cat", check=True).stdout
    logs = journal + lab.ssh("lab-01", "cat /var/log/haproxy.log 2>/dev/null || true").stdout
    assert CANARY not in logs
    assert demo_key(lab) not in logs
    lines = [ln for ln in journal.splitlines() if "/v1/chat/completions" in ln and "demo" in ln]
    assert any(" 200 " in f" {ln} " or "status=200" in ln for ln in lines), lines[-5:]


def test_second_deploy_changes_nothing_and_verify_passes(lab: Lab) -> None:
    proc = deploy({**lab.env})
    assert changes(proc.stdout + proc.stderr) == (0, 0), proc.stdout[-3000:]
    verify = gpunode("verify", INVENTORY, env=lab.env, timeout=900)
    assert verify.returncode == 0, verify.stdout[-4000:] + verify.stderr[-2000:]
