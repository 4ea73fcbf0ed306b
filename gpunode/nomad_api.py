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
token never appears in an error message or a ``repr``.

.. code:: python

    client = NomadClient("https://nomad.example.com:4646", token=token, ca_file="ca.pem")
    result = submit(client, job)             # plan; register only on a difference
    print(result.summary())
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from gpunode.config import Inventory, NodeConfig

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
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def __post_init__(self) -> None:
        self.address = self.address.rstrip("/")
        scheme = urllib.parse.urlsplit(self.address).scheme
        if scheme not in ("http", "https"):
            raise NomadError(f"{self.address!r} is not a Nomad address (allowed: http(s)://...)")
        self._context: ssl.SSLContext | None = None
        if scheme == "https":
            self._context = ssl.create_default_context(cafile=self.ca_file)
            if self.cert_file:
                self._context.load_cert_chain(self.cert_file, self.key_file)

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
                with urllib.request.urlopen(  # noqa: S310 - http(s) only, checked above
                    request, timeout=self.timeout, context=self._context
                ) as response:
                    payload = response.read()
                return json.loads(payload) if payload.strip() else None
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


# --- from an inventory: what `gpunode nomad render|plan|run` does ----------------------------


def acl_token(config: NodeConfig, environ: Mapping[str, str]) -> str | None:
    """The Nomad ACL token: ``$NOMAD_TOKEN`` if set, else read from Vault (KV v2 at
    ``nomad.acl_token_vault``) with the controller's Vault login (``vault:`` section)."""
    if environ.get("NOMAD_TOKEN"):
        return environ["NOMAD_TOKEN"]
    if config.vault.addr is None:
        return None
    from gpunode.vault import Secret, Session

    ref = config.nomad.acl_token_vault
    session = Session(config.vault, dict(environ))
    try:
        secret = Secret(mount=ref.mount, path=ref.path, key=ref.key)
        return session.read("nomad_acl_token", secret).value
    finally:
        session.close()


def client_for(config: NodeConfig, environ: Mapping[str, str]) -> NomadClient:
    nomad = config.nomad
    address = nomad.address or environ.get("NOMAD_ADDR")
    if not address:
        raise NomadError(
            "nomad.address: not set and no $NOMAD_ADDR (allowed: the Nomad HTTP API URL, "
            "e.g. https://nomad.example.com:4646)"
        )
    return NomadClient(
        address,
        token=acl_token(config, environ),
        ca_file=nomad.api_ca_file or environ.get("NOMAD_CACERT"),
        cert_file=nomad.api_cert_file or environ.get("NOMAD_CLIENT_CERT"),
        key_file=nomad.api_key_file or environ.get("NOMAD_CLIENT_KEY"),
        namespace=nomad.namespace,
        region=nomad.region,
    )


def inventory_jobs(inventory: Inventory, limit: list[str] | None = None) -> dict[str, Any]:
    """job ID -> (job, host it was rendered from), for every host (or those in ``limit``,
    hosts or groups). The same job from two hosts must be the same spec."""
    from gpunode.nomad_jobs import render_job

    names = set(inventory.hosts)
    if limit:
        names = {h for item in limit for h in inventory.groups.get(item, (item,))} & names
        if not names:
            raise NomadError(f"--limit {' '.join(limit)}: no such host or group")
    jobs: dict[str, tuple[dict[str, Any], str]] = {}
    for hname, host in inventory.hosts.items():
        if hname not in names:
            continue
        for service in host.config.nomad.jobs:
            job = render_job(host.config, service)
            seen = jobs.get(job["ID"])
            if seen is not None and seen[0] != job:
                raise NomadError(
                    f"job {job['ID']}: hosts {seen[1]} and {hname} render different specs for "
                    "the same service (allowed: one definition, e.g. set it in a group)"
                )
            jobs.setdefault(job["ID"], (job, hname))
    return jobs


def command(
    action: str,
    inventory_path: str,
    limit: list[str] | None = None,
    wait: bool = True,
    timeout: float = 900.0,
    environ: Mapping[str, str] | None = None,
    out: TextIO | None = None,
) -> int:
    """``gpunode nomad render|plan|run``. Exit status: 0 done (plan: nothing to change),
    2 (plan only) changes pending, 1 an error or a failed deployment."""
    from gpunode.inventory import load_inventory_file
    from gpunode.vault import VaultError

    environ = os.environ if environ is None else environ
    out = sys.stdout if out is None else out
    inventory = load_inventory_file(inventory_path)
    try:
        jobs = inventory_jobs(inventory, limit)
        if action == "render":
            rendered = [job for job, _ in jobs.values()]
            out.write(json.dumps(rendered[0] if len(rendered) == 1 else rendered, indent=2) + "\n")
            return 0
        if not jobs:
            out.write("no inference service is listed in nomad.jobs\n")
            return 0
        status = 0
        clients: dict[str, NomadClient] = {}
        for job_id, (job, hname) in jobs.items():
            config = inventory.hosts[hname].config
            key = config.nomad.model_dump_json(include={"address", "namespace", "region"})
            if key not in clients:
                clients[key] = client_for(config, environ)
            nomad = clients[key]
            if action == "plan":
                plan = nomad.plan(job)
                out.write(plan.summary() + "\n")
                if plan.warnings:
                    out.write(f"job {job_id}: warnings: {plan.warnings}\n")
                if plan.changed:
                    status = max(status, 2)
                continue
            try:
                result = submit(nomad, job, wait=wait, timeout=timeout)
            except DeploymentFailed as exc:
                out.write(f"{exc}\n")
                status = 1
                continue
            out.write(result.summary() + "\n")
        return status
    except (NomadError, VaultError) as exc:
        sys.stderr.write(f"gpunode nomad {action}: {exc}\n")
        return 1
