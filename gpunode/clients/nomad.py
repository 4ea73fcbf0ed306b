"""A small client for Nomad's HTTP API: plan, register, wait for the deployment.

Only the endpoints gpunode needs, as documented in Nomad's API docs
(developer.hashicorp.com/nomad/api-docs/jobs):

- ``POST /v1/job/:job_id/plan`` with ``{"Job": ..., "Diff": true}``: a dry run of the
  scheduler; ``Diff.Type`` is ``"None"`` when the submitted job equals the running one
  (the same test ``nomad job plan`` uses for its exit status 0).
- ``POST /v1/jobs`` with ``{"Job": ..., "EnforceIndex": true, "JobModifyIndex": N}``:
  register, but only if nobody changed the job since the plan (check-and-set).
- ``GET /v1/job/:job_id/deployment``: the job's latest deployment, whose ``Status`` is
  ``running``, ``successful``, ``failed``, ``paused`` or ``cancelled``.

Mutual TLS (CA, client certificate and key), the ACL token in the ``X-Nomad-Token``
header, timeouts, and retries with backoff for connection errors, 429 and 5xx. The
token never appears in an error message or a ``repr``. The token goes to the address's
origin only: ``http://`` only to a loopback address or with ``insecure_http``, and a
redirect elsewhere is an error (gpunode/clients/redirects.py).

.. code:: python

    client = NomadClient("https://nomad.example.com:4646", token=token, ca_file="ca.pem")
    result = submit(client, job)             # plan; register only on a difference
    print(result.summary())
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gpunode.clients.redirects import CrossOriginRedirect, SameOriginRedirects
from gpunode.schema.vault import credential_url

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
DEPLOYMENT_DONE = frozenset({"successful", "failed", "cancelled"})


class NomadError(Exception):
    """A Nomad API call failed; the message says which call and why (never the token)."""


class DeploymentFailed(NomadError):
    """The job's deployment ended in ``failed`` or ``cancelled``."""

    def __init__(self, job_id: str, deployment: dict[str, Any]) -> None:
        self.deployment = deployment
        super().__init__(f"job {job_id}: {describe_deployment(deployment)}")


@dataclass(frozen=True)
class Plan:
    """What ``POST /v1/job/:id/plan`` said, in the terms gpunode acts on."""

    job_id: str
    diff_type: str  # "None", "Added", "Edited", "Deleted"
    job_modify_index: int
    desired_updates: dict[str, dict[str, int]]
    failed_allocs: dict[str, Any]
    warnings: str

    @property
    def changed(self) -> bool:
        return self.diff_type != "None"

    def summary(self) -> str:
        parts = []
        for group, updates in sorted(self.desired_updates.items()):
            counts = ", ".join(f"{k.lower()} {v}" for k, v in sorted(updates.items()) if v)
            parts.append(f"{group}: {counts or 'no change'}")
        text = f"job {self.job_id}: diff {self.diff_type}"
        if parts:
            text += f" ({'; '.join(parts)})"
        if self.failed_allocs:
            text += f"; cannot place allocations for: {', '.join(sorted(self.failed_allocs))}"
        return text


@dataclass(frozen=True)
class SubmitResult:
    job_id: str
    plan: Plan
    registered: bool
    eval_id: str | None = None
    deployment: dict[str, Any] | None = None

    def summary(self) -> str:
        if not self.registered:
            return f"job {self.job_id}: unchanged (plan diff None), not registered"
        text = f"job {self.job_id}: registered (eval {self.eval_id})"
        if self.deployment is not None:
            text += f"; {describe_deployment(self.deployment)}"
        return text


def describe_deployment(deployment: dict[str, Any]) -> str:
    """One line: deployment id, status, Nomad's StatusDescription and per-group health."""
    groups = []
    for name, tg in sorted((deployment.get("TaskGroups") or {}).items()):
        groups.append(
            f"{name}: {tg.get('PlacedAllocs', 0)}/{tg.get('DesiredTotal', 0)} placed, "
            f"{tg.get('HealthyAllocs', 0)} healthy, {tg.get('UnhealthyAllocs', 0)} unhealthy"
        )
    text = (
        f"deployment {str(deployment.get('ID', '?'))[:8]} {deployment.get('Status', '?')}: "
        f"{deployment.get('StatusDescription') or 'no description'}"
    )
    if groups:
        text += f" ({'; '.join(groups)})"
    return text


@dataclass
class NomadClient:
    """Nomad's HTTP API over (m)TLS with an ACL token."""

    address: str
    token: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    namespace: str = "default"
    region: str | None = None
    timeout: float = 10.0
    retries: int = 3
    backoff: float = 0.5
    insecure_http: bool = False
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def __post_init__(self) -> None:
        self.address = self.address.rstrip("/")
        scheme = urllib.parse.urlsplit(self.address).scheme
        if scheme not in ("http", "https"):
            raise NomadError(
                f"{urllib.parse.urlsplit(self.address).hostname or 'the address'} is not a "
                "Nomad address (allowed: http(s)://...)"
            )
        try:
            credential_url(self.address, self.insecure_http, "nomad.insecure_http")
        except ValueError as exc:
            raise NomadError(f"Nomad address {exc}") from None
        self._context: ssl.SSLContext | None = None
        if scheme == "https":
            self._context = ssl.create_default_context(cafile=self.ca_file)
            if self.cert_file:
                self._context.load_cert_chain(self.cert_file, self.key_file)
        # The token's transport: TLS as above, redirects only within the address's origin.
        self._opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=self._context),
            SameOriginRedirects(self.address),
        )

    # --- the endpoints ----------------------------------------------------------------

    def plan(self, job: dict[str, Any]) -> Plan:
        job_id = job["ID"]
        resp = self.request("POST", f"/v1/job/{_quote(job_id)}/plan", {"Job": job, "Diff": True})
        diff = resp.get("Diff") or {}
        updates = (resp.get("Annotations") or {}).get("DesiredTGUpdates") or {}
        return Plan(
            job_id=job_id,
            diff_type=str(diff.get("Type", "")),
            job_modify_index=int(resp.get("JobModifyIndex") or 0),
            desired_updates={g: dict(u) for g, u in updates.items()},
            failed_allocs=dict(resp.get("FailedTGAllocs") or {}),
            warnings=str(resp.get("Warnings") or ""),
        )

    def register(self, job: dict[str, Any], job_modify_index: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"Job": job}
        if job_modify_index is not None:
            body.update(EnforceIndex=True, JobModifyIndex=job_modify_index)
        return dict(self.request("POST", "/v1/jobs", body))

    def latest_deployment(self, job_id: str) -> dict[str, Any] | None:
        resp = self.request("GET", f"/v1/job/{_quote(job_id)}/deployment")
        return dict(resp) if resp else None

    def wait_deployment(
        self, job_id: str, job_modify_index: int, timeout: float = 900.0, poll: float = 2.0
    ) -> dict[str, Any]:
        """Poll the job's latest deployment until the one for ``job_modify_index`` (or a
        newer one) has ended; return it if successful, raise DeploymentFailed if not."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while True:
            deployment = self.latest_deployment(job_id)
            if deployment and int(deployment.get("JobModifyIndex", -1)) >= job_modify_index:
                last = deployment
                if deployment.get("Status") == "successful":
                    return deployment
                if deployment.get("Status") in DEPLOYMENT_DONE:
                    raise DeploymentFailed(job_id, deployment)
                if "requires manual promotion" in str(deployment.get("StatusDescription")):
                    raise NomadError(
                        f"job {job_id}: {describe_deployment(deployment)}; promote the canaries "
                        f"with `nomad deployment promote {deployment.get('ID')}` or fail it"
                    )
            if time.monotonic() >= deadline:
                state = describe_deployment(last) if last else "no deployment for this version yet"
                raise NomadError(
                    f"job {job_id}: deployment not finished after {timeout:.0f}s ({state})"
                )
            self.sleep(poll)

    # --- transport -----------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None) -> Any:
        query = {"namespace": self.namespace}
        if self.region:
            query["region"] = self.region
        url = f"{self.address}{path}?{urllib.parse.urlencode(query)}"
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["X-Nomad-Token"] = self.token
        what = f"Nomad API {method} {path}"
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(url, data=data, headers=headers, method=method)  # noqa: S310
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    payload = response.read()
                return json.loads(payload) if payload.strip() else None
            except CrossOriginRedirect as exc:
                raise NomadError(
                    f"{what}: {exc} (allowed: redirects within {exc.start}; set nomad.address "
                    "to the server that answers)"
                ) from None
            except urllib.error.HTTPError as exc:
                text = exc.read().decode(errors="replace").strip()[:300]
                if exc.code in RETRY_STATUS and attempt < self.retries:
                    self.sleep(self.backoff * 2**attempt)
                    continue
                hint = {
                    403: " (the ACL token lacks a capability, e.g. namespace:submit-job)",
                    401: " (no or unknown ACL token)",
                }.get(exc.code, "")
                raise NomadError(f"{what}: HTTP {exc.code}: {text or exc.reason}{hint}") from None
            except urllib.error.URLError as exc:
                reason = exc.reason
                if isinstance(reason, ssl.SSLError):
                    raise NomadError(f"{what}: TLS error: {reason}") from None
                if attempt < self.retries:
                    self.sleep(self.backoff * 2**attempt)
                    continue
                raise NomadError(f"{what}: cannot connect: {reason}") from None
            except ssl.SSLError as exc:  # TLS 1.3: a refused client cert shows after the handshake
                raise NomadError(f"{what}: TLS error: {exc}") from None
            except (TimeoutError, ConnectionError) as exc:
                if attempt < self.retries:
                    self.sleep(self.backoff * 2**attempt)
                    continue
                raise NomadError(f"{what}: {type(exc).__name__}: {exc}") from None
            except json.JSONDecodeError as exc:
                raise NomadError(f"{what}: the answer is not JSON ({exc})") from None
        raise AssertionError("unreachable")


def submit(
    client: NomadClient,
    job: dict[str, Any],
    wait: bool = True,
    timeout: float = 900.0,
    poll: float = 2.0,
) -> SubmitResult:
    """Plan the job; register it only when the plan shows a difference (a converged job
    is a no-op); then wait for its deployment to be healthy (DeploymentFailed if not)."""
    plan = client.plan(job)
    if not plan.changed:
        return SubmitResult(job_id=plan.job_id, plan=plan, registered=False)
    resp = client.register(job, job_modify_index=plan.job_modify_index)
    deployment = None
    if wait:
        deployment = client.wait_deployment(
            plan.job_id, int(resp.get("JobModifyIndex") or 0), timeout=timeout, poll=poll
        )
    return SubmitResult(
        job_id=plan.job_id,
        plan=plan,
        registered=True,
        eval_id=resp.get("EvalID"),
        deployment=deployment,
    )


def _quote(job_id: str) -> str:
    return urllib.parse.quote(job_id, safe="")
