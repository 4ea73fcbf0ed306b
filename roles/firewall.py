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
5. only then disarm the timer and make the candidate the ruleset loaded at boot;
6. then write and enable the boot unit (it loads only that confirmed file);
7. and last stop and disable a firewall that would fight gpunode's (ufw, firewalld).

If step 4 fails the host fails with the reason, and the node returns to its previous
ruleset by itself when the timer fires: ufw/firewalld still run, and the boot
configuration is as it was.

.. code:: python

    from roles.firewall import firewall
    firewall()
"""

from __future__ import annotations

from io import StringIO

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.systemd import SystemdStatus
from pyinfra.operations import apt, dnf, files, python, server, systemd

from gpunode import firewall as rules
from gpunode.base import host_matches
from gpunode.facts.firewall import FirewallState
from gpunode.facts.server import HostInfo
from gpunode.inventory import node_and_distro
from gpunode.operations.firewall import confirm_new_connection
from gpunode.operations.server import notice
from gpunode.paths import template
from gpunode.schema import distros


@deploy("gpunode firewall")
def firewall() -> None:
    config, spec = node_and_distro(host)
    fw = config.firewall
    if not host_matches(spec, host.get_fact(HostInfo)):
        return  # roles/base.py has failed this host with the reason
    if not fw.enabled:
        _disabled()
        return

    if spec.family == "apt":
        apt.packages(name="nftables", packages=["nftables"], no_recommends=True)
    else:
        dnf.packages(name="nftables", packages=["nftables"])

    ssh_port = int(host.data.get("ssh_port") or 22)
    ruleset = rules.render_ruleset(config, ssh_port)
    files.directory(
        name="Firewall directory", path=rules.FIREWALL_DIR, mode="700", user="root", group="root"
    )
    now = host.get_fact(FirewallState)
    converged = (
        now["active_sha1"] == rules.sha1(ruleset)
        and now["loaded"]
        and now["live_matches"]
        and not now["rollback_armed"]
    )
    if converged:  # a candidate left by a run that failed to confirm has been rolled back
        files.file(
            name="No leftover candidate ruleset", path=rules.FIREWALL_CANDIDATE, present=False
        )
    else:
        _apply(ruleset, fw.rollback_seconds)
    unit = files.put(
        name="Firewall boot unit",
        src=template("firewall", rules.FIREWALL_UNIT),
        dest=f"/etc/systemd/system/{rules.FIREWALL_UNIT}",
        mode="644",
        user="root",
        group="root",
    )
    systemd.daemon_reload(name="Reload systemd units", _if=unit.did_change)
    systemd.service(
        name="Firewall loaded at boot", service=rules.FIREWALL_UNIT, running=None, enabled=True
    )
    # only now that gpunode's ruleset is confirmed and loaded at boot (a failed apply above
    # has stopped this host): the firewall it replaces stays until then
    _stop_conflicting_firewalls(spec)


def _apply(ruleset: str, rollback_seconds: int) -> None:
    """Check, arm the rollback, load, confirm from a new connection, then disarm."""
    files.put(
        name="Firewall ruleset candidate",
        src=StringIO(ruleset),
        dest=rules.FIREWALL_CANDIDATE,
        mode="600",
        user="root",
        group="root",
    )
    server.shell(
        name="Check the candidate ruleset (nft -c)",
        commands=[f"nft -c -f {rules.FIREWALL_CANDIDATE}"],
    )
    server.shell(
        name="Arm the firewall rollback timer",
        commands=[rules.arm_rollback_command(rollback_seconds)],
    )
    server.shell(name="Load the candidate ruleset", commands=[f"nft -f {rules.FIREWALL_CANDIDATE}"])
    python.call(
        name="Confirm a new SSH connection gets in",
        function=confirm_new_connection,
        timeout=min(15.0, rollback_seconds / 2),
    )
    server.shell(
        name="Disarm the rollback and keep the ruleset for boot", commands=[rules.CONFIRM_COMMAND]
    )


def _stop_conflicting_firewalls(spec: distros.DistroSpec) -> None:
    units = host.get_fact(SystemdStatus)
    for unit in rules.CONFLICTING_FIREWALLS[spec.family]:
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
            commands=[f"nft delete table inet {rules.NFT_TABLE}"],
        )
    systemd.service(
        name="Firewall not loaded at boot (disabled)",
        service=rules.FIREWALL_UNIT,
        running=None,
        enabled=False,
    )
    files.file(name="No firewall ruleset (disabled)", path=rules.FIREWALL_ACTIVE, present=False)
    notice(name="Firewall", message="firewall.enabled is false: gpunode's table is not loaded")
