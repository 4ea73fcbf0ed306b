"""The firewall role's two guards, run as the role runs them (its own command strings from
gpunode/firewall.py, over SSH) against a lab host's real systemd and nftables:

* a run that arms the rollback while an earlier, unconfirmed run's rollback is still armed
  keeps the table that one saved (the last confirmed one), not what the unconfirmed run
  loaded;
* confirming after the rollback timer has fired fails, and leaves the ruleset loaded at
  boot as it was (the node runs its previous firewall, and says so).

The unit tests see these only as shell text; here the timer really fires.
"""

from __future__ import annotations

import json
import shlex
import time

import pytest

from gpunode import firewall as rules

from .conftest import Lab, dry, pyinfra

INVENTORY = "inventories/lab.py"
DEPLOY = "tests/lab/firewall_deploy.py"
HOST = "lab-01"
# What an unconfirmed run loaded: the confirmed ruleset and one rule more.
EXTRA_RULE = 'add rule inet gpunode input tcp dport 9 drop comment "unconfirmed"'
TIMER = f"{rules.ROLLBACK_UNIT}.timer"


@pytest.fixture(scope="module")
def confirmed(lab: Lab) -> Lab:
    """lab-01 with gpunode's ruleset applied and confirmed by the role (nftables installed
    first, as tests/lab/test_firewall.py does)."""
    proxy = f"-o Acquire::http::Proxy={lab.settings.proxy_url}"
    lab.ssh(
        HOST,
        f"apt-get -q {proxy} update >/dev/null && DEBIAN_FRONTEND=noninteractive "
        f"apt-get -q -y {proxy} install --no-install-recommends nftables >/dev/null",
        check=True,
        timeout=300,
    )
    done = pyinfra(INVENTORY, DEPLOY, "--limit", HOST, env=lab.env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return lab


def live(lab: Lab) -> str:
    return lab.ssh(HOST, "nft -s list table inet gpunode", check=True).stdout


def sha1_of(lab: Lab, path: str) -> str:
    return lab.ssh(HOST, f"sha1sum {path}", check=True).stdout.split()[0]


def load_unconfirmed(lab: Lab) -> None:
    """What a run does between arming and confirming: a new candidate, loaded."""
    lab.ssh(
        HOST,
        f"cp {rules.FIREWALL_ACTIVE} {rules.FIREWALL_CANDIDATE} && "
        f"echo {shlex.quote(EXTRA_RULE)} >> {rules.FIREWALL_CANDIDATE} && "
        f"nft -f {rules.FIREWALL_CANDIDATE}",
        check=True,
    )
    assert "unconfirmed" in live(lab)


def wait_rolled_back(lab: Lab, before: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while live(lab) != before:
        assert time.monotonic() < deadline, "the rollback did not restore the confirmed table"
        time.sleep(0.5)


def disarm(lab: Lab) -> None:
    lab.ssh(HOST, f"systemctl stop {TIMER}; rm -f {rules.FIREWALL_CANDIDATE}; true")


def test_a_run_while_a_rollback_is_armed_keeps_the_last_confirmed_table(
    confirmed: Lab,
) -> None:
    lab = confirmed
    before = live(lab)
    try:
        lab.ssh(HOST, rules.arm_rollback_command(600), check=True)  # the unconfirmed run
        load_unconfirmed(lab)
        lab.ssh(HOST, rules.arm_rollback_command(600), check=True)  # the next run, still armed
        saved = lab.ssh(HOST, f"cat {rules.FIREWALL_ROLLBACK}", check=True).stdout
        assert "unconfirmed" not in saved
        lab.ssh(HOST, f"systemctl start {rules.ROLLBACK_UNIT}.service", check=True)  # fire now
        wait_rolled_back(lab, before, 10)
    finally:
        disarm(lab)
    assert "unconfirmed" not in live(lab)


def test_confirming_after_the_timer_fired_fails_and_keeps_the_boot_ruleset(
    confirmed: Lab,
) -> None:
    lab = confirmed
    before = live(lab)
    boot = sha1_of(lab, rules.FIREWALL_ACTIVE)
    try:
        lab.ssh(HOST, rules.arm_rollback_command(3), check=True)
        load_unconfirmed(lab)
        wait_rolled_back(lab, before)  # the timer fired: the previous table is back
        proc = lab.ssh(HOST, rules.CONFIRM_COMMAND)
        assert proc.returncode != 0
        assert "the rollback timer fired before the new ruleset was confirmed" in proc.stderr
        assert sha1_of(lab, rules.FIREWALL_ACTIVE) == boot  # what boot loads is unchanged
        assert live(lab) == before
        assert lab.ssh(HOST, f"test -e {rules.FIREWALL_CANDIDATE}").returncode == 0
    finally:
        disarm(lab)


def test_after_a_rollback_the_next_run_changes_nothing(confirmed: Lab) -> None:
    """After both: the confirmed table is live and loaded at boot, no rollback is armed, so
    the role plans no change on the host (a dry run's results table)."""
    lab = confirmed
    plan = dry("--json", INVENTORY, DEPLOY, "--limit", HOST, env=lab.env, timeout=900)
    assert plan.returncode == 0, plan.stdout[-3000:] + plan.stderr[-3000:]
    ops = json.loads(plan.stdout)["plan"]
    assert ops, "the dry run planned no operation at all"
    assert [op["name"] for op in ops if op["hosts_with_change"]] == []
