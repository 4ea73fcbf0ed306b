"""The lab's isolation and services: the proxy allows the archive only, hosts have no route out,
OpenBao answers AppRole logins."""

from __future__ import annotations

import json

import hvac

from .conftest import Lab


def test_hosts_have_no_route_beyond_the_lab(lab: Lab) -> None:
    # `ip route get` asks the host's routing table; it sends no packet.
    proc = lab.ssh("lab-01", "ip route get 192.0.2.1")
    assert proc.returncode != 0 and "unreachable" in proc.stderr.lower()
    assert lab.ssh("lab-01", f"ip route get {lab.address('lab-02')}").returncode == 0


def test_hosts_reach_each_other(lab: Lab) -> None:
    script = (
        f"import socket; s=socket.create_connection(('{lab.address('lab-02')}', 22), timeout=3); "
        "print(s.recv(64).decode().strip())"
    )
    proc = lab.ssh("lab-01", f'python3 -c "{script}"')
    assert proc.returncode == 0 and proc.stdout.startswith("SSH-2.0-OpenSSH")


def test_proxy_refuses_anything_but_the_archive(lab: Lab) -> None:
    # A name under .invalid can never resolve: if the filter failed, nothing would leave anyway.
    script = (
        "import urllib.request as u, urllib.error as e\n"
        f"o = u.build_opener(u.ProxyHandler({{'http': '{lab.settings.proxy_url}'}}))\n"
        "try:\n    o.open('http://blocked.invalid/', timeout=10)\nexcept e.HTTPError as x:\n"
        "    print(x.code)\n"
    )
    proc = lab.ssh("lab-01", "python3 -", input=script)
    assert proc.stdout.strip() == "403", proc.stdout + proc.stderr


def test_openbao_approle_login_and_demo_secret(lab: Lab, monkeypatch) -> None:
    monkeypatch.delenv("VAULT_TOKEN", raising=False)
    creds = json.loads((lab.state_dir / "vault.json").read_text())
    assert (lab.state_dir / "vault.json").stat().st_mode & 0o077 == 0
    client = hvac.Client(url=creds["addr"], token="")
    client.auth.approle.login(role_id=creds["role_id"], secret_id=creds["secret_id"])
    secret = client.secrets.kv.v2.read_secret_version(
        path=creds["demo_path"], mount_point=creds["kv_mount"], raise_on_deleted_version=True
    )
    assert len(secret["data"]["data"]["api_key"]) >= 24
    # The AppRole policy reads gpunode/* and nothing else.
    denied = False
    try:
        client.secrets.kv.v2.create_or_update_secret(path="gpunode/demo", secret={"x": "y"})
    except hvac.exceptions.Forbidden:
        denied = True
    assert denied
