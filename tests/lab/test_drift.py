"""gpunode drift on real lab hosts: hand-made drift is reported exactly, --apply corrects
it, an unreachable host is an error while the others are still reported."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from gpunode.commands.lab import inventory_spec
from gpunode.paths import REPO_ROOT
from gpunode.provenance import repository_state

from .conftest import Lab, gpunode, pyinfra

INVENTORY = "inventories/lab.py"
DEPLOY = "deploys/gpu_node.py"
PROVENANCE = "gpunode provenance | Provenance record"
# A live ruleset that differs from gpunode's is reloaded the safe way (roles/firewall.py).
FIREWALL_RELOAD = [
    "gpunode firewall | Firewall ruleset candidate",
    "gpunode firewall | Check the candidate ruleset (nft -c)",
    "gpunode firewall | Arm the firewall rollback timer",
    "gpunode firewall | Load the candidate ruleset",
    "gpunode firewall | Confirm a new SSH connection gets in",
    "gpunode firewall | Disarm the rollback and keep the ruleset for boot",
]


def repo() -> dict:
    """The deploy repository's commit and dirtiness now (what the provenance role records)."""
    return repository_state.__wrapped__(str(REPO_ROOT))


@pytest.fixture(scope="module")
def converged(lab: Lab) -> Lab:
    for _ in range(5):  # until the repository held still during a whole deploy
        before = repo()
        pyinfra(INVENTORY, DEPLOY, env=lab.env, check=True)
        if repo() == before:
            break
    return lab


def recorded_source(lab: Lab, host: str = "lab-02") -> dict:
    """The deploy source (commit, dirty) in a host's provenance record."""
    out = lab.ssh(host, "cat /etc/gpunode/provenance.json", check=True).stdout
    return json.loads(out)["repository"]


def drift(lab: Lab, *args: str, inventory: str = INVENTORY):
    """One drift check, and the provenance drift it must report on top of the hand-made one
    on a host that has some: the record names the repository's commit, so on a host that
    drifted, a commit made in this checkout since the last deploy (by someone else, while
    the test runs) is rewritten too. Retried while the repository moves during the check,
    so the expectation is exact."""
    for _ in range(5):
        source = recorded_source(lab)
        before = repo()
        proc = gpunode("drift", inventory, DEPLOY, *args, env=lab.env, timeout=600)
        if repo() == before:
            break
    return proc, [PROVENANCE] if before != source else []


def apply(lab: Lab, *args: str):
    """One ``drift --apply`` (never retried: it changes hosts). The provenance drift it must
    have found is known only if the repository held still during it (else None); then the
    hosts are settled on one repository state for the next checks."""
    source = recorded_source(lab)
    before = repo()
    proc = gpunode("drift", INVENTORY, DEPLOY, "--apply", *args, env=lab.env, timeout=600)
    after = repo()
    extra = ([PROVENANCE] if before != source else []) if after == before else None
    while after != before:
        before = repo()
        gpunode("drift", INVENTORY, DEPLOY, "--apply", env=lab.env, timeout=600)
        after = repo()
    return proc, extra


def test_hand_made_drift_is_reported_exactly_then_corrected(converged: Lab, tmp_path: Path) -> None:
    # A record naming another commit is no drift by itself (new commits that change
    # nothing on a host must not page anyone).
    converged.ssh(
        "lab-01",
        'sed -i \'s/"commit": "[0-9a-f]*"/"commit": "0000000"/\' '
        '/etc/gpunode/provenance.json && grep -q \'"commit": "0000000"\' '
        "/etc/gpunode/provenance.json",
        check=True,
    )
    clean, _ = drift(converged)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    for name in ("lab-01", "lab-02"):
        assert f"{name}: no drift" in clean.stdout

    converged.ssh(
        "lab-02",
        # a managed file changed, a managed service stopped, a sysctl loosened, a firewall
        # rule added
        "echo RateLimitBurst=1 >> /etc/systemd/journald.conf.d/50-gpunode.conf && "
        "systemctl stop prometheus-node-exporter.service && "
        "sysctl -q -w net.ipv4.conf.all.accept_redirects=1 && "
        "nft add rule inet gpunode input tcp dport 4444 accept",
        check=True,
    )
    report = tmp_path / "drift.json"
    found, extra = drift(converged, "--json", str(report))
    assert found.returncode == 2, found.stdout + found.stderr
    hosts = json.loads(report.read_text())["hosts"]
    assert hosts["lab-01"]["drifted"] == []
    assert hosts["lab-02"]["drifted"] == [
        "gpunode base | journald limits",
        *FIREWALL_RELOAD,
        "gpunode hardening | Network sysctls",
        "gpunode monitoring | node_exporter running",
        *extra,
    ]
    assert "lab-02: drift: " in found.stdout

    prom = tmp_path / "drift.prom"
    fixed, extra = apply(converged, "--prometheus", str(prom), "--json", str(report))
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    lab02 = json.loads(report.read_text())["hosts"]["lab-02"]
    assert lab02["status"] == "corrected" and lab02["remaining"] == []
    hand = [
        "gpunode base | journald limits",
        *FIREWALL_RELOAD,
        "gpunode hardening | Network sysctls",
        "gpunode monitoring | node_exporter running",
    ]
    if extra is None:  # the repository moved during the run: provenance may or may not be in
        assert [n for n in lab02["drifted"] if n != PROVENANCE] == hand
    else:
        assert lab02["drifted"] == [*hand, *extra]
    n = len(lab02["drifted"])
    assert f"lab-02: drift corrected: {n} operation(s), none left" in fixed.stdout
    metrics = prom.read_text()
    assert f'gpunode_drift_operations{{host="lab-02"}} {n}' in metrics
    assert 'gpunode_drift_remaining_operations{host="lab-02"} 0' in metrics
    assert "gpunode_drift_success 1" in metrics

    state = converged.ssh(
        "lab-02",
        "systemctl is-active prometheus-node-exporter.service; "
        "grep -c RateLimitBurst=1$ /etc/systemd/journald.conf.d/50-gpunode.conf; "
        "sysctl -n net.ipv4.conf.all.accept_redirects; "
        "nft list table inet gpunode | grep -c 'dport 4444'",
    )
    assert state.stdout.split() == ["active", "0", "0", "0"]
    again, _ = drift(converged)
    assert again.returncode == 0, again.stdout + again.stderr
    # lab-01 changed nothing: its record was not rewritten for the commit alone
    assert converged.ssh("lab-01", "grep -c 0000000 /etc/gpunode/provenance.json").stdout == "1\n"


def test_unreachable_host_is_an_error_and_the_others_are_reported(
    converged: Lab, tmp_path: Path
) -> None:
    doc, _ = inventory_spec(converged.settings)
    gone = dict(doc["hosts"]["lab-01"])
    # an address in the lab's subnet that no host has
    gone["connection"] = {**gone["connection"], "address": converged.settings.host_address(99)}
    doc["hosts"]["lab-99"] = gone
    (tmp_path / "inv.yml").write_text(yaml.safe_dump(doc))
    inventory = tmp_path / "inv.py"
    inventory.write_text(
        "from gpunode.inventory import from_yaml\n_gpunode = from_yaml(__file__)\n"
        "globals().update(_gpunode.pyinfra_groups())\n"
    )
    prom = tmp_path / "drift.prom"
    proc, _ = drift(converged, "--prometheus", str(prom), inventory=str(inventory))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    for name in ("lab-01", "lab-02"):
        assert f"{name}: no drift" in proc.stdout
    assert re.search(r"^lab-99: error: cannot connect", proc.stdout, re.M), proc.stdout
    metrics = prom.read_text()
    assert 'gpunode_drift_host_ok{host="lab-99"} 0' in metrics
    assert 'gpunode_drift_host_ok{host="lab-01"} 1' in metrics
    assert "gpunode_drift_success 0" in metrics
