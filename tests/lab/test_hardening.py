"""Firewall and hardening on real lab hosts: converge, 0 changes, reachability, anti-lockout.

Reachability is probed for real: throwaway HTTP listeners on lab-01, reached from this
machine (the controller, the lab's gateway address, over IPv4 and IPv6) and from lab-02
(another address), with rules that open one port to each source only and a third to none.
The anti-lockout test applies a ruleset that shuts the controller out of SSH: the run must
fail for that host with the reason, and the node must come back by itself, with its previous
ruleset, once the rollback timer fires.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shlex
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpunode import hardening
from gpunode.config import read_yaml
from gpunode.paths import REPO_ROOT
from gpunode.schema.hardening import Hardening

from .conftest import Lab, changes, host_checks, planned_changes, pyinfra, run

INVENTORY = "inventories/lab.py"
DEPLOY = "tests/lab/hardening_deploy.py"
ROLLBACK_SECONDS = 20  # the smallest bound gpunode accepts: keeps the test short
PORT_CONTROLLER, PORT_PEER, PORT_NOBODY = 18081, 18082, 18083
AGED_USER = "gpunode-pw"


def lab_data(lab: Lab, tmp: Path, name: str, **firewall: Any) -> dict[str, str]:
    """inventories/lab.yml with the probe rules (and overrides) in a file of its own."""
    doc = copy.deepcopy(read_yaml(REPO_ROOT / "inventories" / "lab.yml"))
    defaults = doc.setdefault("defaults", {})
    s = lab.settings
    defaults.setdefault("network", {})["admin_cidrs"] = [str(s.subnet.supernet(new_prefix=16))]
    defaults["firewall"] = {
        "enabled": True,
        "rollback_seconds": ROLLBACK_SECONDS,
        "extra_input": [
            {
                "name": "probe-controller",
                "port": PORT_CONTROLLER,
                "cidrs": [f"{s.gateway}/32", f"{s.gateway6}/128"],
            },
            {"name": "probe-peer", "port": PORT_PEER, "cidrs": [f"{lab.address('lab-02')}/32"]},
        ],
        **firewall,
    }
    path = tmp / f"{name}.yml"
    path.write_text(yaml.safe_dump(doc))
    return {**lab.env, "GPUNODE_LAB_DATA": str(path)}


def can_connect(address: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def peer_can_connect(lab: Lab, peer: str, address: str, port: int) -> bool:
    probe = (
        'python3 -c "import socket,sys; '
        f"s=socket.socket(); s.settimeout(2); sys.exit(s.connect_ex(('{address}', {port})))\""
    )
    return lab.ssh(peer, probe).returncode == 0


def live_table(lab: Lab, host: str) -> str:
    out = lab.ssh(host, "nft -s list table inet gpunode", check=True).stdout
    return hashlib.sha256(out.encode()).hexdigest()


@pytest.fixture(scope="module")
def hardened(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = lab_data(lab, tmp_path_factory.mktemp("hardening"), "probes")
    # a local account with a password (random, never leaves the host): the role ages it
    lab.ssh(
        "lab-01",
        f"useradd -m {AGED_USER} && printf '{AGED_USER}:%s\\n' "
        '"$(head -c 12 /dev/urandom | base64)" | chpasswd',
        check=True,
    )
    first = pyinfra(INVENTORY, DEPLOY, env=env, check=True)
    changed, errors = changes(first.stdout + first.stderr)
    assert errors == 0 and changed > 0
    return env


def test_second_run_changes_nothing(lab: Lab, hardened: dict[str, str]) -> None:
    second = pyinfra(INVENTORY, DEPLOY, env=hardened, check=True)
    assert changes(second.stdout + second.stderr) == (0, 0)
    assert planned_changes(INVENTORY, DEPLOY, hardened) == {}


@pytest.fixture
def listeners(lab: Lab, hardened: dict[str, str]):
    units = []
    for port in (PORT_CONTROLLER, PORT_PEER, PORT_NOBODY):
        unit = f"gpunode-test-probe-{port}"
        lab.ssh(
            "lab-01",
            f"systemd-run --unit={unit} python3 -m http.server --bind :: {port}",
            check=True,
        )
        units.append(unit)
    probe = "; ".join(
        f'python3 -c "import socket,time; [time.sleep(.1) for _ in range(50) '
        f"if socket.socket().connect_ex(('127.0.0.1', {p}))]\""
        for p in (PORT_CONTROLLER, PORT_PEER, PORT_NOBODY)
    )
    lab.ssh("lab-01", probe, check=True)
    # all three listen: each port answers on lab-01's own loopback (accepted: iif lo)
    for port in (PORT_CONTROLLER, PORT_PEER, PORT_NOBODY):
        assert peer_can_connect(lab, "lab-01", "127.0.0.1", port), port
    yield
    lab.ssh("lab-01", "systemctl stop " + " ".join(units))


def test_allowed_ports_reachable_blocked_ports_not(lab: Lab, listeners: None) -> None:
    s = lab.settings
    v4, v6 = lab.address("lab-01"), s.host_address6(1)
    # from this machine (the lab's gateway address), IPv4 and IPv6
    assert can_connect(v4, PORT_CONTROLLER)
    assert can_connect(v6, PORT_CONTROLLER)
    assert not can_connect(v4, PORT_PEER)  # open to lab-02 only
    assert not can_connect(v6, PORT_PEER)
    assert not can_connect(v4, PORT_NOBODY)
    # from lab-02 (another address): the other way round
    assert peer_can_connect(lab, "lab-02", v4, PORT_PEER)
    assert not peer_can_connect(lab, "lab-02", v4, PORT_CONTROLLER)
    assert not peer_can_connect(lab, "lab-02", v4, PORT_NOBODY)
    # SSH from both (admin CIDR), and the drops are logged, rate-limited, in the kernel log
    assert can_connect(v4, 22) and peer_can_connect(lab, "lab-02", v4, 22)


def test_the_boot_unit_loads_the_confirmed_ruleset(lab: Lab, hardened: dict[str, str]) -> None:
    before = live_table(lab, "lab-01")
    assert lab.ssh("lab-01", "systemctl is-enabled gpunode-firewall.service").stdout.strip() == (
        "enabled"
    )
    # what boot does, without a reboot: the table is gone, the unit loads the kept ruleset
    lab.ssh("lab-01", "nft delete table inet gpunode", check=True)
    lab.ssh("lab-01", "systemctl restart gpunode-firewall.service", check=True)
    assert live_table(lab, "lab-01") == before


def test_sshd_takes_keys_only_and_keeps_admin_access(lab: Lab, hardened: dict[str, str]) -> None:
    cfg = str(lab.state_dir / "ssh_config")
    admin = run(["ssh", "-F", cfg, "-l", "labadmin", "lab-01", "sudo -n id -u"], check=True)
    assert admin.stdout.strip() == "0"
    password = run(
        [
            "ssh",
            "-F",
            cfg,
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
            "-o",
            "PubkeyAuthentication=no",
            "-l",
            "labadmin",
            "lab-01",
            "true",
        ]
    )
    assert password.returncode == 255
    assert "Permission denied (publickey)" in password.stderr  # no other method offered
    weak = run(
        ["ssh", "-F", cfg, "-o", "LogLevel=INFO", "-o", "Ciphers=aes128-cbc", "lab-01", "true"]
    )
    assert weak.returncode == 255 and "no matching cipher" in weak.stderr


def test_host_checks_pass(lab: Lab, hardened: dict[str, str]) -> None:
    """tests/host/test_hardening.py as `gpunode verify` runs it (testinfra), on lab-01 (the
    gpu_node deploy test verifies both hosts with every check)."""
    host_checks(lab, "lab-01", "test_hardening.py", hardened, INVENTORY)


def _shadow(lab: Lab, user: str, host: str = "lab-01") -> list[str]:
    return lab.ssh(host, f"getent shadow {user}", check=True).stdout.strip().split(":")


def test_logins_are_aged_hashed_and_masked(lab: Lab, hardened: dict[str, str]) -> None:
    login = Hardening().login  # the lab's data keeps the defaults
    aging = [str(login.password_min_days), str(login.password_max_days)]
    aging.append(str(login.password_warn_days))
    # the account that had a password before the converge: aged by chage
    assert _shadow(lab, AGED_USER)[3:6] == aging
    # root (gpunode connects as root) keeps what it had: no password, no aging from gpunode
    assert _shadow(lab, "root")[1][:1] in ("*", "!")
    # an account made now takes login.defs' values: aging, home directory mode, hashing (on
    # lab-02: lab-01's identity files stay as the deploy left them, for AIDE's tests)
    made = "gpunode-new"
    random = '"$(head -c 12 /dev/urandom | base64)"'
    lab.ssh(
        "lab-02",
        f"useradd -m {made} && printf '{made}:%s\\n' {random} | chpasswd",
        check=True,
    )
    try:
        entry = _shadow(lab, made, "lab-02")
        assert entry[3:6] == aging
        assert entry[1].startswith("$y$"), entry[1][:8]  # PAM's pam_unix: yescrypt, as shipped
        # a tool that hashes by itself takes login.defs' rounds
        lab.ssh("lab-02", f"printf '{made}:%s\\n' {random} | chpasswd -c SHA512", check=True)
        hashed = _shadow(lab, made, "lab-02")[1]
        assert hashed.startswith(f"$6$rounds={login.hash_rounds}$"), hashed[:20]
        mode = lab.ssh("lab-02", f"stat -c %a /home/{made}", check=True).stdout.strip()
        assert mode == "750"  # 777 less the umask 027
    finally:
        lab.ssh("lab-02", f"userdel -r {made}")
    # a login shell has the umask; a new SSH session has a TMPDIR of its own
    assert lab.ssh("lab-01", "bash -lc umask", check=True).stdout.strip() == "0027"
    assert lab.ssh("lab-01", 'echo "$TMPDIR"', check=True).stdout.strip() == "/tmp/user/0"


# Two services running a copy of sleep(1) from a directory needrestart watches; the copy is
# then replaced under them, as a package upgrade replaces a binary or a library.
OLD_CODE = "/usr/local/lib/gpunode-test"
OLD_CODE_UNITS = ("gpunode-test-daemon.service", "gpunode-inference-nrtest.service")


def _main_pid(lab: Lab, unit: str) -> str:
    return lab.ssh("lab-01", f"systemctl show -p MainPID --value {unit}", check=True).stdout


@pytest.fixture
def daemons_on_old_code(lab: Lab, hardened: dict[str, str]):
    units = "".join(
        f"printf '[Service]\\nExecStart={OLD_CODE}/sleep infinity\\n' > /run/systemd/system/{u}; "
        for u in OLD_CODE_UNITS
    )
    lab.ssh(
        "lab-01",
        f"set -e; install -d {OLD_CODE}; cp /usr/bin/sleep {OLD_CODE}/sleep; {units}"
        f"systemctl daemon-reload; systemctl start {' '.join(OLD_CODE_UNITS)}",
        check=True,
    )
    yield
    lab.ssh(
        "lab-01",
        f"systemctl stop {' '.join(OLD_CODE_UNITS)}; "
        + "".join(f"rm -f /run/systemd/system/{u}; " for u in OLD_CODE_UNITS)
        + f"systemctl daemon-reload; rm -rf {OLD_CODE}",
    )


def test_an_upgrade_restarts_daemons_on_old_code_but_not_inference(
    lab: Lab, daemons_on_old_code: None
) -> None:
    """needrestart's own apt hook, after a real package install: the daemon still running the
    replaced binary is restarted, the inference service is listed only."""
    before = {u: _main_pid(lab, u) for u in OLD_CODE_UNITS}
    lab.ssh(
        "lab-01",
        f"cp /usr/bin/sleep {OLD_CODE}/sleep.new && mv {OLD_CODE}/sleep.new {OLD_CODE}/sleep",
        check=True,
    )
    out = lab.ssh(
        "lab-01",
        "DEBIAN_FRONTEND=noninteractive apt-get install -y --reinstall debsums 2>&1",
        check=True,
    ).stdout
    after = {u: _main_pid(lab, u) for u in OLD_CODE_UNITS}
    daemon, inference = OLD_CODE_UNITS
    assert after[daemon] != before[daemon], out  # restarted automatically
    assert after[inference] == before[inference], out  # not restarted...
    assert f"systemctl restart {inference}" in out, out  # ...but listed


def test_package_verification_names_a_changed_file(lab: Lab, hardened: dict[str, str]) -> None:
    unit = "gpunode-package-verify.service"
    enabled = lab.ssh("lab-01", "systemctl is-enabled gpunode-package-verify.timer").stdout
    assert enabled.strip() == "enabled"
    clean = lab.ssh("lab-01", f"systemctl start {unit}")
    assert clean.returncode == 0, clean.stderr
    changed = "/usr/share/doc/debsums/copyright"  # a packaged file (not configuration)
    lab.ssh("lab-01", f"cp -p {changed} /root/saved && echo tampered >> {changed}", check=True)
    try:
        tampered = lab.ssh("lab-01", f"systemctl start {unit}")
        assert tampered.returncode != 0
        result = lab.ssh("lab-01", f"systemctl show -p Result --value {unit}").stdout.strip()
        assert result == "exit-code"
        journal = lab.ssh("lab-01", f"journalctl -u {unit} -n 20 --no-pager", check=True).stdout
        assert changed in journal, journal
    finally:
        lab.ssh("lab-01", f"cp -p /root/saved {changed} && rm -f /root/saved", check=True)
    assert lab.ssh("lab-01", f"systemctl start {unit}").returncode == 0


AIDE_CHECK = "aide --config=/etc/gpunode/aide.conf --check"


def test_file_integrity_reports_a_changed_binary(lab: Lab, hardened: dict[str, str]) -> None:
    assert lab.ssh("lab-01", AIDE_CHECK).returncode == 0  # as the last deploy left it
    binary = "/usr/bin/sleep"
    lab.ssh("lab-01", f"cp -p {binary} /root/sleep.saved && echo x >> {binary}", check=True)
    try:
        found = lab.ssh("lab-01", AIDE_CHECK)
        assert found.returncode == 4, found.stdout  # AIDE: changed entries
        assert f": {binary}\n" in found.stdout, found.stdout
        unit = lab.ssh("lab-01", "systemctl start gpunode-file-integrity.service")
        assert unit.returncode != 0  # the timer's unit fails on it too
        journal = lab.ssh(
            "lab-01", "journalctl -u gpunode-file-integrity -n 60 --no-pager", check=True
        ).stdout
        assert binary in journal, journal
    finally:
        lab.ssh("lab-01", f"cp -p /root/sleep.saved {binary} && rm /root/sleep.saved", check=True)
    assert lab.ssh("lab-01", AIDE_CHECK).returncode == 0


def test_a_deploy_is_not_reported_as_tampering(
    lab: Lab, hardened: dict[str, str], tmp_path: Path
) -> None:
    doc = yaml.safe_load(Path(hardened["GPUNODE_LAB_DATA"]).read_text())
    doc["defaults"]["hardening"] = {"banner": ["Lab hosts: authorized uses only."]}
    data = tmp_path / "banner.yml"
    data.write_text(yaml.safe_dump(doc))
    env = {**hardened, "GPUNODE_LAB_DATA": str(data)}
    try:
        proc = pyinfra(INVENTORY, DEPLOY, "--limit", "lab-01", env=env, check=True)
        assert "File integrity database: this deploy's changes" in proc.stdout + proc.stderr
        issue = lab.ssh("lab-01", "cat /etc/issue", check=True).stdout
        assert issue == "Lab hosts: authorized uses only.\n"
        check = lab.ssh("lab-01", AIDE_CHECK)
        assert check.returncode == 0, check.stdout  # the deploy's own change is not reported
        journal = lab.ssh(
            "lab-01", "journalctl -t gpunode-file-integrity -n 20 --no-pager", check=True
        ).stdout
        assert "taken in by a gpunode deploy: " in journal and "/etc/issue" in journal, journal
    finally:
        pyinfra(INVENTORY, DEPLOY, "--limit", "lab-01", env=hardened, check=True)
    assert lab.ssh("lab-01", AIDE_CHECK).returncode == 0


PROBE_PACKAGE, PROBE_BINARY = "gpunode-upgrade-probe", "/usr/bin/gpunode-upgrade-probe"
UPGRADES, UPDATE_UNIT = "apt-daily-upgrade.service", "gpunode-file-integrity-update.service"


def _install_probe_package(lab: Lab) -> None:
    """A package built here and installed with dpkg, as an upgrade installs one: a new file in
    /usr/bin (watched by AIDE), the package database rewritten."""
    control = (
        f"Package: {PROBE_PACKAGE}\nVersion: 1\nArchitecture: all\n"
        "Maintainer: gpunode lab <lab@gpunode.test>\n"
        "Description: installed by a lab test the way an upgrade installs a package\n"
    )
    lab.ssh(
        "lab-01",
        "set -e; d=$(mktemp -d); mkdir -p $d/DEBIAN $d/usr/bin; "
        f"printf %s {shlex.quote(control)} > $d/DEBIAN/control; "
        f"printf '#!/bin/sh\\necho probe\\n' > $d{PROBE_BINARY}; chmod 755 $d{PROBE_BINARY}; "
        "dpkg-deb --root-owner-group --build $d /root/probe.deb >/dev/null; "
        "dpkg -i /root/probe.deb >/dev/null; rm -rf $d /root/probe.deb",
        check=True,
    )


def _run_upgrades(lab: Lab) -> str:
    """The automatic upgrades' unit started as its timer starts it, then (up to 3 minutes) the
    update unit it wants done; the journal of this round (the update unit's lines, then AIDE's
    lines by their tag)."""
    cursor = lab.ssh("lab-01", "journalctl -q -n 0 --show-cursor", check=True).stdout
    after = shlex.quote(cursor.strip().removeprefix("-- cursor: "))
    lab.ssh("lab-01", f"systemctl start {UPGRADES}", check=True, timeout=900)
    deadline = time.monotonic() + 180
    while True:
        ran = lab.ssh(
            "lab-01",
            f"journalctl --after-cursor={after} -u {UPDATE_UNIT} -o cat --no-pager",
            check=True,
        ).stdout
        if "Finished" in ran or "Failed" in ran:
            break
        assert time.monotonic() < deadline, f"{UPDATE_UNIT} did not run after {UPGRADES}: {ran}"
        time.sleep(1)
    result = lab.ssh("lab-01", f"systemctl show -p Result --value {UPDATE_UNIT}", check=True)
    assert result.stdout.strip() == "success", ran
    if "no package changed" in ran:
        return ran
    # AIDE's lines go through syslog (logger): journald files them under the unit only when it
    # still finds the short-lived logger process, so `-u` can miss them (CI on 111ede1 did).
    # They are read by their identifier, as docs/hardening.md tells users to; filtered here,
    # since journalctl (systemd 252) returns nothing for `--after-cursor` with `-t`.
    everything = f"journalctl --after-cursor={after} -o json --no-pager"
    deadline = time.monotonic() + 30
    while True:
        tagged = [
            entry.get("MESSAGE", "")
            for entry in map(
                json.loads, lab.ssh("lab-01", everything, check=True).stdout.splitlines()
            )
            if entry.get("SYSLOG_IDENTIFIER") == "gpunode-file-integrity"
        ]
        if any(isinstance(m, str) and m.startswith("taken in by") for m in tagged):
            break
        if time.monotonic() > deadline:
            break
        time.sleep(1)
    return ran + "".join(f"{m}\n" for m in tagged if isinstance(m, str))


def test_automatic_upgrades_are_taken_in_once_they_ran(lab: Lab, hardened: dict[str, str]) -> None:
    """What unattended-upgrades installs is not reported as tampering by the next daily check:
    the upgrades' unit (started as its timer starts it) wants the update unit, which takes the
    changes in with each one in the journal; with no package changed since, it takes nothing."""
    assert lab.ssh("lab-01", AIDE_CHECK).returncode == 0  # as the last deploy left it
    _install_probe_package(lab)
    try:
        found = lab.ssh("lab-01", AIDE_CHECK)
        assert found.returncode != 0 and f": {PROBE_BINARY}\n" in found.stdout, found.stdout
        journal = _run_upgrades(lab)
        taken = f"taken in by the automatic upgrades ({UPGRADES}): "
        assert any(
            line.startswith(taken) and line.endswith(f": {PROBE_BINARY}")
            for line in journal.splitlines()
        ), journal
        fields = lab.ssh(
            "lab-01",
            f"journalctl -t gpunode-file-integrity -o json --no-pager -g {PROBE_BINARY} -n 1",
            check=True,
        ).stdout
        entry = json.loads(fields.splitlines()[-1])
        assert (entry["SYSLOG_FACILITY"], entry["PRIORITY"]) == ("10", "5")  # authpriv.notice
        check = lab.ssh("lab-01", AIDE_CHECK)
        assert check.returncode == 0, check.stdout
        database = f"stat -c %Y {hardening.AIDE_DB}"
        before = lab.ssh("lab-01", database, check=True).stdout
        again = _run_upgrades(lab)
        assert "no package changed since the file integrity database was written" in again, again
        assert lab.ssh("lab-01", database, check=True).stdout == before
    finally:
        lab.ssh("lab-01", f"dpkg --purge {PROBE_PACKAGE} >/dev/null", check=True)
        _run_upgrades(lab)  # takes the removal in
    assert lab.ssh("lab-01", AIDE_CHECK).returncode == 0


def test_a_broken_sshd_config_is_never_put_in_place(
    lab: Lab, hardened: dict[str, str], tmp_path: Path
) -> None:
    before = lab.ssh("lab-01", "sha1sum /etc/ssh/sshd_config.d/00-gpunode.conf", check=True).stdout
    doc = yaml.safe_load(Path(hardened["GPUNODE_LAB_DATA"]).read_text())
    doc["defaults"]["hardening"] = {"ssh": {"ciphers": ["no-such-cipher@example.com"]}}
    bad = tmp_path / "bad-sshd.yml"
    bad.write_text(yaml.safe_dump(doc))
    proc = pyinfra(
        INVENTORY, DEPLOY, "--limit", "lab-01", env={**hardened, "GPUNODE_LAB_DATA": str(bad)}
    )
    assert proc.returncode == 1
    assert "Bad SSH2 cipher spec" in proc.stdout + proc.stderr  # sshd -t -f said why
    after = lab.ssh("lab-01", "sha1sum /etc/ssh/sshd_config.d/00-gpunode.conf", check=True).stdout
    assert after == before
    assert lab.ssh("lab-01", "sshd -t && true").returncode == 0


def test_admin_cidrs_without_the_controller_are_refused_at_load(lab: Lab, tmp_path: Path) -> None:
    env = lab_data(lab, tmp_path, "excluded")
    doc = yaml.safe_load(Path(env["GPUNODE_LAB_DATA"]).read_text())
    doc["defaults"]["network"]["admin_cidrs"] = ["192.0.2.0/24"]
    Path(env["GPUNODE_LAB_DATA"]).write_text(yaml.safe_dump(doc))
    proc = pyinfra(INVENTORY, DEPLOY, env=env)
    assert proc.returncode == 2
    assert (
        f"host lab-01: network.admin_cidrs: this controller reaches {lab.address('lab-01')} "
        f"from {lab.settings.gateway}, which none of [192.0.2.0/24] covers"
    ) in proc.stderr
    assert "Connecting" not in proc.stdout  # refused before any host was touched


def test_a_ruleset_that_locks_the_controller_out_rolls_back_by_itself(
    lab: Lab, hardened: dict[str, str], tmp_path: Path
) -> None:
    before = live_table(lab, "lab-01")
    env = lab_data(lab, tmp_path, "lockout", force_admin_cidrs=True)
    doc = yaml.safe_load(Path(env["GPUNODE_LAB_DATA"]).read_text())
    doc["defaults"]["network"]["admin_cidrs"] = ["192.0.2.0/24"]  # not the controller
    Path(env["GPUNODE_LAB_DATA"]).write_text(yaml.safe_dump(doc))

    started = time.monotonic()
    proc = pyinfra(INVENTORY, DEPLOY, "--limit", "lab-01", env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert "host lab-01: firewall: a new SSH connection from the controller failed" in out
    assert "Starting operation: gpunode firewall | Disarm" not in out  # never disarmed
    # it really was locked out: a new SSH connection does not get in now
    assert not can_connect(lab.address("lab-01"), 22, timeout=1)

    deadline = started + ROLLBACK_SECONDS + 30
    while time.monotonic() < deadline and not can_connect(lab.address("lab-01"), 22, 1):
        time.sleep(1)
    back_after = time.monotonic() - started
    assert lab.ssh("lab-01", "true").returncode == 0, "the node did not roll back by itself"
    assert back_after <= ROLLBACK_SECONDS + 30
    assert live_table(lab, "lab-01") == before  # the previous ruleset, exactly
    assert lab.ssh("lab-01", "systemctl is-active gpunode-firewall-rollback.timer").returncode != 0
    # the next run with the good config finds the firewall as it was (only the rolled-back
    # candidate file is left to clean up)
    assert planned_changes(INVENTORY, DEPLOY, hardened) == {
        "lab-01": ["gpunode firewall | No leftover candidate ruleset"]
    }
    pyinfra(INVENTORY, DEPLOY, env=hardened, check=True)
    assert planned_changes(INVENTORY, DEPLOY, hardened) == {}
