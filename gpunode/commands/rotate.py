"""`gpunode rotate`: a new secret version in Vault, rolled out host by host with health checks.

    gpunode rotate inventories/prod.py llm_api_key --generate [--batch 2] [--destroy-old]
    printf %s "$NEW" | gpunode rotate inventories/prod.py llm_api_key --value-from-stdin

1. Write the new value as a new KV v2 version with check-and-set on the current
   version (the other keys of the secret are kept; a concurrent writer makes it fail).
2. For each batch of hosts (``--batch N``, default 1) run deploys/rotate_secrets.py
   (the secrets role) for this secret at the new version, through gpunode.commands.run
   (gpunode's leak-proof file operation; dependent services restart when their file
   changed), then wait until every service in the secret's ``restart`` list is active
   and its ``health_url`` answers 2xx.
3. A host that fails (deploy or health) stops the rollout: it is reported, put back
   on the previous version when the secret's ``rollback`` is true (``--rollback`` /
   ``--no-rollback`` override), and no further host is touched. Exit status 1.
4. With ``--destroy-old`` and every host healthy, the previous version is destroyed.

The value is never printed; the report names hosts, versions and services.
"""

from __future__ import annotations

import secrets as _random
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyinfra.api import StringCommand

from gpunode.clients.vault import Session, VaultError, session_for
from gpunode.commands import run
from gpunode.inventory import load_inventory_file
from gpunode.paths import REPO_ROOT
from gpunode.schema.node import Host, host_data
from gpunode.schema.types import ConfigError
from gpunode.schema.vault import Secret

# The secrets role alone, for one secret at one version (see the file).
ROTATE_DEPLOY = REPO_ROOT / "deploys" / "rotate_secrets.py"


class RotateError(Exception):
    """Rotation refused or failed before any host was touched."""


@dataclass
class HostResult:
    host: str
    version: int
    ok: bool
    detail: str
    rolled_back_to: int | None = None


@dataclass
class Rotation:
    secret: str
    old_version: int
    new_version: int
    results: list[HostResult] = field(default_factory=list)
    destroyed: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)


def generate_value() -> str:
    """A new random value: 32 bytes, URL-safe base64 (43 characters)."""
    return _random.token_urlsafe(32)


def secret_hosts(hosts: list[Host], name: str) -> tuple[list[Host], Secret]:
    """The hosts that declare ``name`` and its one definition (refused when they differ)."""
    using = [h for h in hosts if name in h.config.secrets]
    if not using:
        declared = sorted({s for h in hosts for s in h.config.secrets}) or ["none"]
        raise RotateError(f"secret {name}: no host declares it (allowed: {', '.join(declared)})")
    first = using[0]
    secret = first.config.secrets[name]
    for h in using:
        other = h.config.secrets[name]
        if (other.mount, other.path, other.key) != (secret.mount, secret.path, secret.key):
            raise RotateError(
                f"secret {name}: host {h.name} reads {other.where()}, host {first.name} reads "
                f"{secret.where()} (allowed: one Vault source per secret name to rotate)"
            )
        if h.config.vault != first.config.vault:
            raise RotateError(
                f"secret {name}: host {h.name} has other vault settings than {first.name}"
            )
        if other.version is not None:
            raise RotateError(
                f"secret {name}: host {h.name} pins version {other.version} (allowed: remove "
                f"secrets.{name}.version to rotate)"
            )
    return using, secret


def rotate(
    hosts: list[Host],
    name: str,
    value: str,
    batch: int = 1,
    rollback: bool | None = None,
    destroy_old: bool = False,
    say: Callable[[str], None] = print,
    session: Session | None = None,
) -> Rotation:
    if batch < 1:
        raise RotateError(f"--batch {batch}: allowed: 1 or more")
    if not value or "\n" in value:
        raise RotateError(f"secret {name}: the new value must be one non-empty line")
    using, secret = secret_hosts(hosts, name)
    rollback = secret.rollback if rollback is None else rollback
    session = session or session_for(using[0].config.vault)

    old = int(session.metadata(name, secret).get("current_version") or 0)
    new = session.write(name, secret, value, cas=old)
    rotation = Rotation(secret=name, old_version=old, new_version=new)
    say(f"secret {name}: wrote version {new} of {secret.where()} (check-and-set on {old})")

    for start in range(0, len(using), batch):
        group = using[start : start + batch]
        try:
            results = _roll_out(group, name, secret, new)
        except VaultError as exc:  # Vault went away mid-rotation: nothing more is touched
            rest = [h.name for h in using[start:]]
            rotation.results += [HostResult(h, new, False, "not touched") for h in rest]
            say(
                f"secret {name}: rotation stopped: {exc}; not touched: {', '.join(rest)}; "
                f"Vault's latest version is {new} (the next deploy rolls it out)"
            )
            return rotation
        rotation.results += results
        for r in results:
            say(f"{r.host}: version {new}: {'healthy' if r.ok else 'FAILED'}: {r.detail}")
        failed = [r for r in results if not r.ok]
        if not failed:
            continue
        if rollback and old:
            back = {h.name: h for h in group if h.name in {r.host for r in failed}}
            for r in _roll_out(list(back.values()), name, secret, old):
                match = next(f for f in failed if f.host == r.host)
                match.rolled_back_to = old if r.ok else None
                state = "healthy" if r.ok else "STILL FAILING"
                say(f"{r.host}: rolled back to version {old}: {state}: {r.detail}")
        rest = [h.name for h in using[start + batch :]]
        say(
            f"secret {name}: rotation stopped at {', '.join(f.host for f in failed)}; "
            f"not touched: {', '.join(rest) or 'none'}; Vault's latest version is {new} "
            "(the next deploy rolls it out: fix the service, or write the old value back)"
        )
        return rotation

    if destroy_old and old:
        session.destroy(name, secret, [old])
        rotation.destroyed = [old]
        say(f"secret {name}: destroyed version {old}")
    say(f"secret {name}: version {new} is on {len(using)} host(s), all healthy")
    return rotation


def _roll_out(group: list[Host], name: str, secret: Secret, version: int) -> list[HostResult]:
    """Deploy ``version`` of the secret to ``group`` and wait for their services' health.

    deploys/rotate_secrets.py runs through gpunode.commands.run with the secret's name and
    version as host data (no value: the deploy reads it from Vault). A Vault error while
    planning is raised (nothing was deployed in this group); the hosts stay connected for
    the health checks."""
    inventory = run.inventory_from((h.name, host_data(h)) for h in group)
    data = {"gpunode_secret": name, "gpunode_secret_version": version}
    results: dict[str, HostResult] = {}
    with run.prepare(inventory, ROTATE_DEPLOY, data=data, detect_changes=False) as deploy:
        for planned in deploy.results().values():
            if isinstance(planned.exception, VaultError):
                raise planned.exception
        outcome = deploy.execute(all_or_nothing=True)
        for h in group:
            error = outcome[h.name].error
            if error is None:
                results[h.name] = _wait_healthy(deploy.host(h.name), secret, version)
                continue
            if error.startswith("operation failed") or error == "the deploy failed":
                error = "the deploy failed (file or service restart)"
            results[h.name] = HostResult(h.name, version, False, error)
    return [results[h.name] for h in group]


def _wait_healthy(host, secret: Secret, version: int) -> HostResult:  # noqa: ANN001
    if not secret.restart:
        return HostResult(host.name, version, True, "file written (no service to check)")
    checks = []
    for service in secret.restart:
        checks.append(
            (service.name, StringCommand("systemctl", "is-active", "--quiet", service.name))
        )
        if service.health_url:
            checks.append(
                (
                    service.health_url,
                    StringCommand(
                        "curl",
                        "-fsS",
                        "-o",
                        "/dev/null",
                        "--max-time",
                        "5",
                        shlex.quote(service.health_url),
                    ),
                )
            )
    started = time.monotonic()
    deadline = started + secret.health_timeout
    failing = ""
    while True:
        failing = ""
        for what, command in checks:
            ok, _ = host.run_shell_command(command)
            if not ok:
                failing = what
                break
        if not failing:
            took = time.monotonic() - started
            names = ", ".join(s.name for s in secret.restart)
            return HostResult(host.name, version, True, f"{names} healthy after {took:.1f} s")
        if time.monotonic() > deadline:
            return HostResult(
                host.name,
                version,
                False,
                f"health check {failing} failing after {secret.health_timeout:.0f} s",
            )
        time.sleep(0.5)


def main(inventory: str, name: str, value: str, **kwargs) -> int:  # noqa: ANN003
    """CLI entry: 0 when every host is healthy on the new version, 1 otherwise."""
    inv = load_inventory_file(inventory)
    try:
        rotation = rotate(list(inv.hosts.values()), name, value, **kwargs)
    except (RotateError, VaultError, ConfigError) as exc:
        print(f"gpunode rotate: {exc}", flush=True)
        return 1
    return 0 if rotation.ok else 1
