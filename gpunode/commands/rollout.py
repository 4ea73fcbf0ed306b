"""Rollouts: deploy to a few hosts at a time, canary first, and stop at the first failure.

``gpunode rollout INVENTORY`` runs the deploy (default ``deploys/gpu_node.py``) on the
canary host(s) first, then on the other hosts in batches, in this process through
gpunode.commands.run (as ``pyinfra -y INVENTORY DEPLOY --limit ...`` would: a planning
error on any host of a batch runs nothing there). After each batch it waits, from
the controller, until every inference service of every host in the batch answers its
health endpoint (through the firewall's allowed port, as clients would), up to a timeout.
On a failure (the deploy failed on a host, or a service is not healthy in time) it stops:
the hosts after the batch are not touched, the report names the host, the service and why.
With ``--revert`` a failed host's services whose model link this rollout switched are put
back on their previous model (the ``current``/``previous`` links are swapped atomically and
the unit is restarted), and their health is checked again. A host whose links could not be
read before its deploy, or after it (ssh failed), is not reverted, and the report says so:
what the rollout switched there is not known, and a swap could put a service on an older
model than it had.

.. code:: shell

    gpunode rollout inventories/prod.py --canary 1 --batch-size 4 --revert
"""

from __future__ import annotations

import ipaddress
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from gpunode.commands import run
from gpunode.inference import service_dir, unit_name
from gpunode.operations.artifacts import revert_script
from gpunode.schema.inference import Service
from gpunode.schema.node import Host, Inventory
from gpunode.schema.runtimes import PROFILES


def batches(hosts: list[str], canary: int = 1, batch_size: int = 1) -> list[list[str]]:
    """The order of a rollout: the first ``canary`` hosts alone, then ``batch_size`` at a time.

    >>> batches(["a", "b", "c", "d", "e"], canary=1, batch_size=2)
    [['a'], ['b', 'c'], ['d', 'e']]
    """
    if canary < 0 or batch_size < 1:
        raise ValueError("canary must be >= 0 and batch_size >= 1")
    out = [hosts[:canary]] if canary and hosts else []
    rest = hosts[canary:]
    out += [rest[i : i + batch_size] for i in range(0, len(rest), batch_size)]
    return out


@dataclass
class Step:
    host: str
    ok: bool
    detail: str


@dataclass
class Report:
    steps: list[Step] = field(default_factory=list)
    untouched: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps)

    def lines(self) -> list[str]:
        out = [f"{s.host}: {'ok' if s.ok else 'FAILED'}: {s.detail}" for s in self.steps]
        if self.untouched:
            out.append(f"not touched (rollout stopped): {', '.join(self.untouched)}")
        return out


def ssh_command(host: Host, command: str) -> list[str]:
    """ssh argv for a host, from its validated connection settings."""
    c = host.connection
    argv = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=15", "-p", str(c.port)]
    if c.ssh_config_file:
        argv += ["-F", c.ssh_config_file]
    if c.key_file:
        argv += ["-i", c.key_file, "-o", "IdentitiesOnly=yes"]
    if c.known_hosts_file:
        argv += ["-o", f"UserKnownHostsFile={c.known_hosts_file}"]
    argv += ["-o", f"StrictHostKeyChecking={c.strict_host_key_checking}"]
    return [*argv, f"{c.user}@{c.address}", command]


def health_url(host: Host, svc: Service) -> str:
    """The health endpoint as a client reaches it (the host's address, the service's port)."""
    address = host.connection.address
    if svc.listen not in ("0.0.0.0", "::"):  # noqa: S104
        address = svc.listen
    if ":" in address:
        address = f"[{address}]"
    return f"http://{address}:{svc.port}{PROFILES[svc.runtime].health_path}"


def check_health(host: Host, svc: Service, timeout: float, runner: Runner) -> str | None:
    """None once the service answers 2xx on its health path. A service behind a gateway (on
    loopback, or fronted by gateways on other hosts, whose firewall lets only them in) is
    asked on its node, over SSH; any other from here, as a client would."""
    listen = ipaddress.ip_address(svc.listen)
    services = host.config.inference.services
    remote = any(services.get(name) == svc for name in host.config.gateway_sources)
    if not listen.is_loopback and not remote:
        return wait_healthy(health_url(host, svc), timeout)
    asked = svc.listen
    if listen.is_unspecified:  # a wildcard listen answers on loopback too
        asked = "::1" if listen.version == 6 else "127.0.0.1"
    address = f"[{asked}]" if ":" in asked else asked
    url = f"http://{address}:{svc.port}{PROFILES[svc.runtime].health_path}"
    script = (
        f"deadline=$(($(date +%s) + {int(timeout)})); "
        f"until curl -fsS -o /dev/null --max-time 5 {shlex.quote(url)}; do "
        '[ "$(date +%s)" -ge "$deadline" ] && exit 1; sleep 1; done'
    )
    proc = runner(ssh_command(host, script))
    if proc.returncode == 0:
        return None
    return f"{url} on {host.name} not healthy after {timeout:.0f}s"


def wait_healthy(url: str, timeout: float, interval: float = 1.0) -> str | None:
    """None once ``url`` answers 2xx; else the last error after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - http(s) only
                if 200 <= resp.status < 300:
                    return None
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(getattr(exc, "reason", exc))
        if time.monotonic() >= deadline:
            return f"{url} not healthy after {timeout:.0f}s ({last})"
        time.sleep(interval)


# Runs one command for the rollout: an ssh argv, or a DeployRequest.
Runner = Callable[[list[str]], subprocess.CompletedProcess[str]]


class DeployRequest(list[str]):
    """One batch's deploy, as the argv of the pyinfra command it is equivalent to
    (``python -m pyinfra -y INVENTORY DEPLOY --limit HOST ...``), which is what a runner
    is given. The default runner executes it in this process through
    gpunode.commands.run; a runner given instead (tests) may record it or run that argv."""

    def __init__(self, inventory_file: str, deploy: str, hosts: list[str]) -> None:
        limits = [arg for name in hosts for arg in ("--limit", name)]
        super().__init__([sys.executable, "-m", "pyinfra", "-y", inventory_file, deploy, *limits])
        self.inventory_file = inventory_file
        self.deploy = deploy
        self.hosts = list(hosts)


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    if isinstance(argv, DeployRequest):
        return _deploy(argv)
    return subprocess.run(
        argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=3600
    )


def _deploy(request: DeployRequest) -> subprocess.CompletedProcess[str]:
    """Run the deploy on the batch through gpunode.commands.run (like ``pyinfra -y``: a
    planning error on any host runs nothing anywhere). The result reads like pyinfra's
    CLI output: exit status 1 when a host failed, its errors on lines prefixed
    ``[host]``, with gpunode's own messages (``gpunode: ...``) from the failed operation."""
    try:
        inventory = run.load_inventory(request.inventory_file, request.hosts)
        results = run.run(inventory, request.deploy, apply=True)
    except Exception as exc:  # noqa: BLE001 - the run failed as a whole, as the CLI's exit 1
        return subprocess.CompletedProcess(request, 1, "", f"pyinfra error: {exc}\n")
    lines: list[str] = []
    for name, result in results.items():
        if result.error is None:
            continue
        ours = [ln.strip() for ln in result.output if ln.strip().startswith("gpunode:")]
        lines += [f"[{name}] {ln}" for ln in ours]
        lines.append(f"[{name}] Error: {result.error}")
    stderr = "".join(f"{ln}\n" for ln in lines)
    return subprocess.CompletedProcess(request, 1 if lines else 0, "", stderr)


def current_links(host: Host, runner: Runner = _run) -> dict[str, str]:
    """service -> where its ``current`` link points now ("" when none, and for every
    service when the host could not be asked)."""
    links = _read_links(host, runner)
    return {n: "" for n in host.config.inference.services} if links is None else links


def _read_links(
    host: Host, runner: Runner, errors: list[str] | None = None
) -> dict[str, str] | None:
    """service -> where its ``current`` link points now ("" when none); None when the host
    could not be asked (ssh failed: the end of its error is added to ``errors``)."""
    names = list(host.config.inference.services)
    if not names:
        return {}
    script = "; ".join(
        f"echo {n}=$(readlink {shlex.quote(service_dir(n) + '/current')})" for n in names
    )
    proc = runner(ssh_command(host, script))
    if proc.returncode != 0:
        if errors is not None:
            errors.append(proc.stderr.strip()[-200:] or f"exit status {proc.returncode}")
        return None
    links = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return {n: links.get(n, "") for n in names}


def rollout(
    inventory_file: str,
    inventory: Inventory,
    deploy: str = "deploys/gpu_node.py",
    hosts: list[str] | None = None,
    canary: int = 1,
    batch_size: int = 1,
    timeout: float | None = None,
    revert: bool = False,
    runner: Runner = _run,
    say: Callable[[str], None] = print,
) -> Report:
    """Run the rollout; see the module docstring."""
    names = hosts or list(inventory.hosts)
    report = Report()
    plan = batches(names, canary, batch_size)
    for index, batch in enumerate(plan):
        label = "canary" if index == 0 and canary else f"batch {index}"
        say(f"rollout: {label}: {', '.join(batch)}")
        before = {h: _read_links(inventory.hosts[h], runner) for h in batch}
        proc = runner(DeployRequest(inventory_file, deploy, batch))
        failed = False
        for name in batch:
            host = inventory.hosts[name]
            problems = []
            if proc.returncode != 0 and _host_failed(proc, name, batch):
                problems.append(f"deploy failed: {_last_error(proc, name)}")
            for svc_name, svc in host.config.inference.services.items():
                if not svc.enabled:
                    continue
                err = check_health(host, svc, timeout or svc.health_timeout, runner)
                if err:
                    problems.append(f"{svc_name}: {err}")
            if not problems:
                report.steps.append(Step(name, True, f"{label}: deployed and healthy"))
                continue
            failed = True
            detail = f"{label}: " + "; ".join(problems)
            if revert:
                detail += "; " + _revert(host, before[name], runner, timeout)
            report.steps.append(Step(name, False, detail))
        if failed:
            report.untouched = [h for b in plan[index + 1 :] for h in b]
            break
    return report


def _host_failed(proc: subprocess.CompletedProcess[str], name: str, batch: list[str]) -> bool:
    """Whether pyinfra's failed run failed this host: pyinfra prefixes a host's errors with
    ``[host]``; an error that names no host of the batch counts against all of them."""
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "rror" in ln]
    named = {h for h in batch for ln in errors if f"[{h}]" in ln}
    return name in named or not named


def _last_error(proc: subprocess.CompletedProcess[str], name: str) -> str:
    lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith(f"[{name}] gpunode:")]  # gpunode's own words
    mine = ours or [ln for ln in lines if ln.startswith(f"[{name}]") and "rror" in ln]
    return (mine or lines or [f"exit status {proc.returncode}"])[-1][:300]


def _revert(
    host: Host, before: dict[str, str] | None, runner: Runner, timeout: float | None
) -> str:
    if before is None:  # what this rollout switched is not known: a swap could go further back
        return "not reverted: the model links could not be read before the deploy"
    errors: list[str] = []
    after = _read_links(host, runner, errors)
    if after is None:  # not known what the deploy switched: nothing is swapped blind
        return f"not reverted: the model links could not be read after the deploy ({errors[0]})"
    switched = [n for n, target in after.items() if target and target != before.get(n)]
    if not switched:
        return "nothing to revert (no model link was switched)"
    results = []
    for name in switched:
        unit = unit_name(name)
        script = (
            f"{revert_script(service_dir(name))} && systemctl reset-failed {unit}; "
            f"systemctl restart {unit}"
        )
        proc = runner(ssh_command(host, script))
        if proc.returncode != 0:
            results.append(f"{name}: revert FAILED ({proc.stderr.strip()[-200:]})")
            continue
        svc = host.config.inference.services[name]
        err = check_health(host, svc, timeout or svc.health_timeout, runner)
        back = before.get(name, "").rsplit("/", 1)[-1][:12]
        results.append(
            f"{name}: reverted to model {back}, "
            + ("healthy" if err is None else f"not healthy: {err}")
        )
    return "; ".join(results)
