"""Firewall role: gpunode's own nftables table, applied with an automatic rollback.

The ruleset (``templates/firewall/gpunode.nft.j2``, rules from
:func:`gpunode.hardening.allow_rules`) replaces only ``table inet gpunode`` in one
transaction; Docker's, Kubernetes' and the distro's tables are left alone. A new
ruleset goes live like this, and only when it differs from what the node runs:

1. upload it as a candidate and check it with ``nft -c -f``;
2. arm a rollback on the node: a transient systemd timer that restores the previous
   gpunode table after ``firewall.rollback_seconds``;
3. load it;
4. open a NEW SSH connection from the controller (the established rule keeps the old
   one alive, so only a new one proves SSH still gets in);
5. only then disarm the timer and make the candidate the ruleset loaded at boot.

If step 4 fails the host fails with the reason, and the node returns to its previous
ruleset by itself when the timer fires.

.. code:: python

    from roles.firewall import firewall
    firewall()
"""

from __future__ import annotations

import time
from io import StringIO
from typing import Any

from pyinfra import host
from pyinfra.api import StringCommand, deploy
from pyinfra.api.exceptions import PyinfraError
from pyinfra.connectors.ssh import SSHConnector
from pyinfra.connectors.sshuserclient import SSHClient
from pyinfra.facts.systemd import SystemdStatus
from pyinfra.operations import apt, dnf, files, python, server, systemd

from gpunode import distros
from gpunode.facts import HostInfo
from gpunode.hardening import (
    CONFLICTING_FIREWALLS,
    FIREWALL_ACTIVE,
    FIREWALL_CANDIDATE,
    FIREWALL_DIR,
    FIREWALL_LIVE_SHA,
    FIREWALL_ROLLBACK,
    FIREWALL_UNIT,
    NFT_TABLE,
    ROLLBACK_UNIT,
    render_ruleset,
    sha1,
)
from gpunode.hardening_facts import FirewallState
from gpunode.inventory import node_config
from gpunode.operations import notice
from gpunode.paths import TEMPLATES
from roles.base import host_matches

T = TEMPLATES / "firewall"

# The stateless listing of gpunode's table, hashed the same way FirewallState hashes it.
LIVE_SHA1 = (
    f'live=$(nft -s list table inet {NFT_TABLE}) && printf "%s\\n" "$live" | sha1sum | '
    "cut -d' ' -f1"
)


def arm_rollback_command(seconds: int) -> str:
    """Save the running gpunode table as a restore script and start a timer that loads it.

    The script deletes gpunode's table and re-creates it as it was (or leaves it deleted
    when there was none); it is checked with ``nft -c`` before the timer is armed. A
    rollback still armed by an earlier run that never confirmed keeps its saved table:
    that one is the last confirmed ruleset, not what the unconfirmed run loaded.
    """
    timer = f"{ROLLBACK_UNIT}.timer"
    return "\n".join(
        [
            "set -e",
            f"if ! systemctl is-active --quiet {timer} || [ ! -s {FIREWALL_ROLLBACK} ]; then",
            f"  {{ echo 'table inet {NFT_TABLE}'; echo 'delete table inet {NFT_TABLE}'; "
            f"nft list table inet {NFT_TABLE} 2>/dev/null || true; }} > {FIREWALL_ROLLBACK}.tmp",
            f"  mv {FIREWALL_ROLLBACK}.tmp {FIREWALL_ROLLBACK}",
            "fi",
            f"nft -c -f {FIREWALL_ROLLBACK}",
            f"systemctl stop {timer} 2>/dev/null || true",
            f"systemctl reset-failed {timer} {ROLLBACK_UNIT}.service 2>/dev/null || true",
            f"systemd-run --quiet --unit={ROLLBACK_UNIT} --on-active={seconds}s "
            "--timer-property=AccuracySec=1s "
            "--description='gpunode: restore the previous firewall' "
            f"/usr/sbin/nft -f {FIREWALL_ROLLBACK}",
        ]
    )


CONFIRM_COMMAND = " && ".join(
    [
        f"{{ systemctl is-active --quiet {ROLLBACK_UNIT}.timer || {{ echo 'gpunode: the "
        "rollback timer fired before the new ruleset was confirmed: the node runs its "
        "previous firewall' >&2; exit 1; }; }",
        f"systemctl stop {ROLLBACK_UNIT}.timer",
        f"install -m 600 {FIREWALL_CANDIDATE} {FIREWALL_ACTIVE}",
        f"rm -f {FIREWALL_CANDIDATE}",
        f"{LIVE_SHA1} > {FIREWALL_LIVE_SHA}",
    ]
)


def confirm_new_connection(state: Any, host: Any, timeout: float) -> bool:
    """Open a NEW connection to the host with its own connection data and run ``true``.

    Over SSH: pyinfra's own SSH client and settings (key, known_hosts, strict host key
    checking), with ``timeout`` for each attempt, retried until ``timeout`` has passed.
    Raises with the reason when no new connection got through.
    """
    connector = host.connector
    deadline = time.monotonic() + timeout
    last: Exception | str = "no attempt"
    while time.monotonic() < deadline:
        remaining = max(1.0, deadline - time.monotonic())
        try:
            if isinstance(connector, SSHConnector):
                _ssh_true(connector, remaining)
            else:  # another connector (e.g. @fake in the tests): a fresh instance of it
                fresh = type(connector)(state, host)
                fresh.connect()
                ok, _ = fresh.run_shell_command(StringCommand("true"))
                if not ok:
                    raise PyinfraError("`true` failed on the new connection")
            return True
        except Exception as exc:  # noqa: BLE001 - any failure is "not confirmed"
            last = exc
            time.sleep(1)
    raise PyinfraError(
        f"host {host.name}: firewall: a new SSH connection from the controller failed after "
        f"the new ruleset was loaded ({type(last).__name__}: {last}); the node restores its "
        "previous ruleset by itself when the rollback timer fires (check network.admin_cidrs "
        "covers this controller)"
    )


def _ssh_true(connector: SSHConnector, timeout: float) -> None:
    kwargs = connector.make_paramiko_kwargs()
    hostname = kwargs.pop("hostname")
    kwargs.update(timeout=timeout, banner_timeout=timeout, auth_timeout=timeout)
    client = SSHClient()
    try:
        client.connect(hostname, **kwargs)
        _, stdout, _ = client.exec_command("true", timeout=timeout)
        status = stdout.channel.recv_exit_status()
        if status != 0:
            raise PyinfraError(f"`true` exited {status} on the new connection")
    finally:
        client.close()


@deploy("gpunode firewall")
def firewall() -> None:
    config = node_config(host)
    fw = config.firewall
    assert config.distro is not None  # guaranteed by config loading
    spec = distros.get(config.distro)
    if not host_matches(spec, host.get_fact(HostInfo)):
        return  # roles/base.py has failed this host with the reason
    if not fw.enabled:
        _disabled()
        return

    if spec.family == "apt":
        apt.packages(name="nftables", packages=["nftables"], no_recommends=True)
    else:
        dnf.packages(name="nftables", packages=["nftables"])
    _stop_conflicting_firewalls(spec)

    ssh_port = int(host.data.get("ssh_port") or 22)
    ruleset = render_ruleset(config, ssh_port)
    files.directory(name="Firewall directory", path=FIREWALL_DIR, mode="700")
    now = host.get_fact(FirewallState)
    converged = (
        now["active_sha1"] == sha1(ruleset)
        and now["loaded"]
        and now["live_matches"]
        and not now["rollback_armed"]
    )
    if converged:  # a candidate left by a run that failed to confirm has been rolled back
        files.file(name="No leftover candidate ruleset", path=FIREWALL_CANDIDATE, present=False)
    else:
        _apply(ruleset, fw.rollback_seconds)
    unit = files.put(
        name="Firewall boot unit",
        src=str(T / FIREWALL_UNIT),
        dest=f"/etc/systemd/system/{FIREWALL_UNIT}",
        mode="644",
    )
    systemd.daemon_reload(name="Reload systemd units", _if=unit.did_change)
    systemd.service(
        name="Firewall loaded at boot", service=FIREWALL_UNIT, running=None, enabled=True
    )


def _apply(ruleset: str, rollback_seconds: int) -> None:
    """Check, arm the rollback, load, confirm from a new connection, then disarm."""
    files.put(
        name="Firewall ruleset candidate",
        src=StringIO(ruleset),
        dest=FIREWALL_CANDIDATE,
        mode="600",
    )
    server.shell(
        name="Check the candidate ruleset (nft -c)",
        commands=[f"nft -c -f {FIREWALL_CANDIDATE}"],
    )
    server.shell(
        name="Arm the firewall rollback timer",
        commands=[arm_rollback_command(rollback_seconds)],
    )
    server.shell(name="Load the candidate ruleset", commands=[f"nft -f {FIREWALL_CANDIDATE}"])
    python.call(
        name="Confirm a new SSH connection gets in",
        function=confirm_new_connection,
        timeout=min(15.0, rollback_seconds / 2),
    )
    server.shell(
        name="Disarm the rollback and keep the ruleset for boot", commands=[CONFIRM_COMMAND]
    )


def _stop_conflicting_firewalls(spec: distros.DistroSpec) -> None:
    units = host.get_fact(SystemdStatus)
    for unit in CONFLICTING_FIREWALLS[spec.family]:
        if unit in units:
            systemd.service(
                name="Stop a firewall that conflicts with gpunode's",
                service=unit,
                running=False,
                enabled=False,
            )


def _disabled() -> None:
    now = host.get_fact(FirewallState)
    if now["loaded"]:
        server.shell(
            name="Remove gpunode's nftables table (firewall disabled)",
            commands=[f"nft delete table inet {NFT_TABLE}"],
        )
    systemd.service(
        name="Firewall not loaded at boot (disabled)",
        service=FIREWALL_UNIT,
        running=None,
        enabled=False,
    )
    files.file(name="No firewall ruleset (disabled)", path=FIREWALL_ACTIVE, present=False)
    notice(name="Firewall", message="firewall.enabled is false: gpunode's table is not loaded")
