"""gpunode/clients/nomad.py and gpunode/commands/nomad.py against a real local HTTP(S) server
replaying Nomad's answers.

No Nomad agent can run here. ``Replay`` (in harness.py) is a real ``http.server`` on
127.0.0.1 (an ephemeral port, optionally TLS with a throwaway CA made by this test with the
``cryptography`` package) that answers by method and path with the responses recorded
in ``fixtures/nomad/`` (where each comes from: ``fixtures/nomad/SOURCES.md``) and
records every request, so the tests assert what the client sent: the plan with
``Diff: true``, the ``X-Nomad-Token`` header, register skipped when the plan's
``Diff.Type`` is ``None`` and sent (with check-and-set) when it differs, the deployment
polled until it ends, a failed deployment reported with Nomad's StatusDescription, TLS
verification with the right CA and failure with a wrong one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Pki, Server, fixture, make_pki, serve_mtls

from gpunode.clients.nomad import DeploymentFailed, NomadClient, NomadError, submit

FIXTURES = Path(__file__).parent / "fixtures" / "nomad"
TOKEN = "d7c1e5e0-gpunode-test-token-3f2a"  # noqa: S105 - a test ACL token SecretID
JOB = {"ID": "my-job", "Name": "my-job", "Type": "service", "TaskGroups": []}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), "nomad")


@pytest.fixture
def tls_server(pki: Pki) -> Iterator[Server]:
    yield from serve_mtls(pki)  # Nomad's verify_https_client


def client(address: str, **kwargs: Any) -> NomadClient:
    kwargs.setdefault("token", TOKEN)
    return NomadClient(address, sleep=lambda s: None, **kwargs)


# --- plan and register --------------------------------------------------------------------


def test_converged_job_is_planned_with_diff_and_not_registered(server: Server) -> None:
    server.replay.add("POST", "/v1/job/my-job/plan", (200, fixture("plan-none.json")))
    result = submit(client(server.address), JOB)
    assert not result.registered
    assert result.summary() == "job my-job: unchanged (plan diff None), not registered"
    (plan,) = server.replay.calls("POST", "/v1/job/my-job/plan")
    assert plan.body == {"Job": JOB, "Diff": True}
    assert plan.headers["x-nomad-token"] == TOKEN
    assert plan.query == {"namespace": ["default"]}
    assert server.replay.calls("POST", "/v1/jobs") == []  # converged: a no-op


def test_changed_job_is_registered_with_check_and_set_and_waited_for(server: Server) -> None:
    replay = server.replay
    replay.add("POST", "/v1/job/my-job/plan", (200, fixture("plan-added.json")))
    # Scenario: the docs' register sample, with JobModifyIndex 19 = the version the docs'
    # deployment samples belong to (see SOURCES.md).
    replay.add("POST", "/v1/jobs", (200, dict(fixture("register.json"), JobModifyIndex=19)))
    replay.add(
        "GET",
        "/v1/job/my-job/deployment",
        (200, fixture("deployments-list.json")[1]),  # the previous version's deployment
        (200, fixture("deployment-running.json")),
        (200, fixture("deployment-running.json")),
        (200, fixture("deployment-successful.json")),
    )
    result = submit(client(server.address), JOB, poll=0)
    assert result.registered and result.eval_id == "d092fdc0-e1fd-2536-67d8-43af8ca798ac"
    assert result.deployment is not None and result.deployment["Status"] == "successful"
    (register,) = replay.calls("POST", "/v1/jobs")
    # the plan's JobModifyIndex (0: a new job) guards the register against a concurrent change
    assert register.body == {"Job": JOB, "EnforceIndex": True, "JobModifyIndex": 0}
    assert register.headers["x-nomad-token"] == TOKEN
    assert len(replay.calls("GET", "/v1/job/my-job/deployment")) == 4  # polled until done
    assert "deployment 85ee4a9a successful: Deployment completed successfully" in result.summary()
    assert [r.method for r in replay.requests][:2] == ["POST", "POST"]  # plan before register


def test_failed_deployment_is_reported_with_nomads_description(server: Server) -> None:
    replay = server.replay
    replay.add("POST", "/v1/job/my-job/plan", (200, fixture("plan-added.json")))
    replay.add("POST", "/v1/jobs", (200, dict(fixture("register.json"), JobModifyIndex=19)))
    replay.add(
        "GET",
        "/v1/job/my-job/deployment",
        (200, fixture("deployment-running.json")),
        (200, fixture("deployment-failed.json")),
    )
    with pytest.raises(DeploymentFailed) as exc:
        submit(client(server.address), JOB, poll=0)
    assert str(exc.value) == (
        "job my-job: deployment 85ee4a9a failed: Failed due to unhealthy allocations - "
        "rolling back to job version 0 (cache: 2/3 placed, 0 healthy, 2 unhealthy)"
    )
    assert TOKEN not in str(exc.value)


def test_canaries_waiting_for_manual_promotion_stop_the_wait(server: Server) -> None:
    # Nomad's DeploymentStatusDescriptionRunningNeedsPromotion (nomad/structs/deployment.go)
    waiting = dict(
        fixture("deployment-running.json"),
        StatusDescription="Deployment is running but requires manual promotion",
    )
    server.replay.add("GET", "/v1/job/my-job/deployment", (200, waiting))
    with pytest.raises(NomadError, match=r"nomad deployment promote 85ee4a9a-339f"):
        client(server.address).wait_deployment("my-job", 19, timeout=60, poll=0)


def test_deployment_wait_times_out_clearly(server: Server) -> None:
    server.replay.add("GET", "/v1/job/my-job/deployment", (200, fixture("deployment-running.json")))
    with pytest.raises(NomadError, match=r"not finished after 0s \(deployment 85ee4a9a running"):
        client(server.address).wait_deployment("my-job", 19, timeout=0, poll=0)


def test_plan_summary_names_groups_that_cannot_be_placed(server: Server) -> None:
    server.replay.add("POST", "/v1/job/my-job/plan", (200, fixture("plan-added.json")))
    plan = client(server.address).plan(JOB)
    assert plan.changed and plan.diff_type == "Added"
    assert plan.summary() == (
        "job my-job: diff Added (cache: place 11); cannot place allocations for: cache"
    )


def test_permission_denied_is_clear_and_not_retried(server: Server) -> None:
    server.replay.add(
        "POST", "/v1/job/my-job/plan", (403, (FIXTURES / "error-403.txt").read_text())
    )
    with pytest.raises(NomadError) as exc:
        submit(client(server.address), JOB)
    assert str(exc.value) == (
        "Nomad API POST /v1/job/my-job/plan: HTTP 403: Permission denied "
        "(the ACL token lacks a capability, e.g. namespace:submit-job)"
    )
    assert TOKEN not in str(exc.value) and TOKEN not in repr(client(server.address))
    assert len(server.replay.requests) == 1


def test_server_errors_are_retried_then_reported(server: Server) -> None:
    server.replay.add(
        "POST",
        "/v1/job/my-job/plan",
        (500, "rpc error: No cluster leader"),
        (503, "rpc error: No cluster leader"),
        (200, fixture("plan-none.json")),
    )
    assert not submit(client(server.address, retries=3), JOB).registered
    assert len(server.replay.requests) == 3
    server.replay.requests.clear()
    server.replay.add("POST", "/v1/job/my-job/plan", (500, "rpc error: No cluster leader"))
    with pytest.raises(NomadError, match="HTTP 500: rpc error: No cluster leader"):
        client(server.address, retries=2).plan(JOB)
    assert len(server.replay.requests) == 3  # 1 + 2 retries


def test_connection_refused_is_reported(server: Server) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(NomadError, match=r"POST /v1/job/my-job/plan: cannot connect"):
        client(f"http://127.0.0.1:{port}", retries=1).plan(JOB)


def test_namespace_and_job_id_are_encoded(server: Server) -> None:
    server.replay.add("POST", "/v1/job/chat%2Fv1/plan", (200, fixture("plan-none.json")))
    client(server.address, namespace="inference").plan(dict(JOB, ID="chat/v1"))
    (call,) = server.replay.requests
    assert call.path == "/v1/job/chat%2Fv1/plan" and call.query == {"namespace": ["inference"]}


def test_no_token_sends_no_header(server: Server) -> None:
    server.replay.add("POST", "/v1/job/my-job/plan", (200, fixture("plan-none.json")))
    client(server.address, token=None).plan(JOB)
    assert "x-nomad-token" not in server.replay.requests[0].headers


# --- TLS -----------------------------------------------------------------------------------


def test_mutual_tls_with_the_right_ca(tls_server: Server, pki: Pki) -> None:
    tls_server.replay.add("POST", "/v1/job/my-job/plan", (200, fixture("plan-none.json")))
    nomad = client(
        tls_server.address,
        ca_file=str(pki.ca),
        cert_file=str(pki.client_cert),
        key_file=str(pki.client_key),
    )
    assert not submit(nomad, JOB).registered
    assert tls_server.replay.requests[0].headers["x-nomad-token"] == TOKEN


def test_tls_with_a_wrong_ca_fails(tls_server: Server, pki: Pki) -> None:
    tls_server.replay.add("POST", "/v1/job/my-job/plan", (200, fixture("plan-none.json")))
    nomad = client(
        tls_server.address,
        ca_file=str(pki.other_ca),
        cert_file=str(pki.client_cert),
        key_file=str(pki.client_key),
    )
    with pytest.raises(NomadError, match=r"TLS error: .*CERTIFICATE_VERIFY_FAILED"):
        nomad.plan(JOB)
    assert tls_server.replay.requests == []  # nothing was sent, the token included


def test_tls_without_a_client_certificate_is_refused(tls_server: Server, pki: Pki) -> None:
    tls_server.replay.add("POST", "/v1/job/my-job/plan", (200, fixture("plan-none.json")))
    with pytest.raises(NomadError, match=r"POST /v1/job/my-job/plan: (TLS error|cannot connect)"):
        client(tls_server.address, ca_file=str(pki.ca), retries=0).plan(JOB)
    assert tls_server.replay.requests == []


def test_address_must_be_http() -> None:
    with pytest.raises(NomadError, match="not a Nomad address"):
        NomadClient("ftp://nomad.example.com")
