"""Checks for roles/firewall.py and roles/hardening.py: every control, on the running host."""

from __future__ import annotations

import json

import pytest

from gpunode import firewall as firewall_rules
from gpunode import hardening
from gpunode.paths import TEMPLATES
from gpunode.schema import distros
from gpunode.schema import hardening as hardening_schema
from gpunode.schema.node import Host


@pytest.fixture(scope="module")
def firewall_on(node: Host) -> None:
    if not node.config.firewall.enabled:
        pytest.skip("firewall.enabled is false for this host")


@pytest.fixture(scope="module")
def hardening_on(node: Host) -> None:
    if not node.config.hardening.enabled:
        pytest.skip("hardening.enabled is false for this host")


# --- firewall ----------------------------------------------------------------------------


def _chains(as_root) -> dict[str, dict]:
    out = as_root(f"nft -j list table inet {firewall_rules.NFT_TABLE}")
    assert out.rc == 0, f"gpunode's table is not loaded: {out.stderr}"
    items = json.loads(out.stdout)["nftables"]
    return {i["chain"]["name"]: i["chain"] for i in items if "chain" in i}


def test_firewall_table_is_loaded_with_drop_policies(firewall_on, as_root) -> None:
    chains = _chains(as_root)
    assert (chains["input"]["hook"], chains["input"]["policy"]) == ("input", "drop")
    assert (chains["forward"]["hook"], chains["forward"]["policy"]) == ("forward", "drop")


def test_firewall_allows_exactly_the_configured_sources(firewall_on, node: Host, as_root) -> None:
    live = as_root(f"nft -s list chain inet {firewall_rules.NFT_TABLE} input").stdout
    rules = [r for r in live.splitlines() if "accept comment" in r]
    wanted = firewall_rules.allow_rules(node.config, node.connection.port)
    assert len(rules) == sum(bool(a.v4) + bool(a.v6) for a in wanted)
    for allow in wanted:
        mine = [r for r in rules if r.strip().endswith(f'comment "{allow.name}"')]
        for cidr in allow.cidrs:  # nft lists a single address (/32, /128) without its prefix
            shown = str(cidr.network_address) if cidr.prefixlen == cidr.max_prefixlen else str(cidr)
            assert any(f" {shown} " in r or f" {shown}," in r for r in mine), (allow.name, cidr)
        for port in allow.ports:
            assert all(str(port) in r and allow.proto in r for r in mine), (allow.name, mine)
    if node.config.firewall.log_drops:
        assert 'log prefix "gpunode-drop input: "' in live


def test_firewall_live_rules_are_the_confirmed_ones(firewall_on, as_root) -> None:
    live = as_root(
        f'live=$(nft -s list table inet {firewall_rules.NFT_TABLE}) && printf "%s\\n" "$live" '
        "| sha1sum | cut -d' ' -f1"
    ).stdout.strip()
    assert live == as_root(f"cat {firewall_rules.FIREWALL_LIVE_SHA}").stdout.strip()


def test_firewall_persisted_and_loaded_at_boot(firewall_on, host, node: Host, as_root) -> None:
    active = as_root(f"cat {firewall_rules.FIREWALL_ACTIVE}")
    assert active.stdout == firewall_rules.render_ruleset(node.config, node.connection.port)
    assert host.file(firewall_rules.FIREWALL_ACTIVE).mode == 0o600
    assert as_root(f"nft -c -f {firewall_rules.FIREWALL_ACTIVE}").rc == 0
    assert host.service(firewall_rules.FIREWALL_UNIT).is_enabled
    assert (
        "flush ruleset"
        not in host.file(f"/etc/systemd/system/{firewall_rules.FIREWALL_UNIT}").content_string
    )


def test_firewall_no_rollback_pending(firewall_on, host) -> None:
    assert not host.service(f"{firewall_rules.ROLLBACK_UNIT}.timer").is_running
    assert not host.file(firewall_rules.FIREWALL_CANDIDATE).exists


def test_no_conflicting_firewall_runs(firewall_on, host, spec: distros.DistroSpec) -> None:
    for unit in firewall_rules.CONFLICTING_FIREWALLS[spec.family]:
        assert not host.service(unit.removesuffix(".service")).is_running, unit


def test_forwarding_matches_the_container_setting(firewall_on, host, node: Host) -> None:
    forward = host.check_output("sysctl -n net.ipv4.ip_forward")
    assert forward == ("1" if node.config.firewall.containers else "0")


# --- sshd --------------------------------------------------------------------------------


def test_sshd_effective_settings(hardening_on, node: Host, as_root) -> None:
    out = as_root("/usr/sbin/sshd -T")
    assert out.rc == 0, out.stderr
    effective: dict[str, str] = {}
    for line in out.stdout.splitlines():
        key, _, value = line.partition(" ")
        effective.setdefault(key, value)
    aliases = {"without-password": "prohibit-password"}  # OpenSSH prints the old name
    for key, value in hardening.sshd_options(node.config, node.connection.user).items():
        assert aliases.get(effective.get(key, ""), effective.get(key)) == value, key


def test_sshd_config_is_valid(hardening_on, as_root) -> None:
    out = as_root("/usr/sbin/sshd -t")
    assert out.rc == 0, out.stderr


def test_sshd_files_strict(hardening_on, host) -> None:
    for path in ("/etc/ssh/sshd_config", hardening.SSHD_DROPIN):
        f = host.file(path)
        assert (f.user, f.group, f.mode) == ("root", "root", 0o600), path


def test_sshd_keeps_admin_access(hardening_on, as_login, node: Host) -> None:
    # this check runs over a NEW key-based SSH login of the inventory's user
    assert as_login("id -un") == node.connection.user


# --- sysctl ------------------------------------------------------------------------------


def test_sysctl_persisted(hardening_on, host, node: Host) -> None:
    f = host.file(hardening.SYSCTL_FILE)
    assert f.content_string == hardening.render_sysctl(node.config)
    assert (f.user, f.mode) == ("root", 0o644)


def _sysctls(host, keys: list[str]) -> dict[str, str]:
    """Running values, one `sysctl` call for all keys."""
    out = host.check_output(f"sysctl {' '.join(keys)}")
    return {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in out.splitlines())}


def test_sysctl_network_keys_live(hardening_on, host, node: Host) -> None:
    wanted = {
        k: str(v)
        for k, v in hardening.sysctl_settings(node.config).items()
        if not hardening.is_kernel_key(k)
    }
    assert _sysctls(host, sorted(wanted)) == wanted


def test_sysctl_kernel_keys_live(hardening_on, host, node: Host, in_container: bool) -> None:
    if in_container:
        pytest.skip("kernel-wide sysctls are read-only in a container (persisted, checked above)")
    wanted = {
        k: str(v)
        for k, v in hardening.sysctl_settings(node.config).items()
        if hardening.is_kernel_key(k)
    }
    assert _sysctls(host, sorted(wanted)) == wanted


# --- login banner --------------------------------------------------------------------------


def test_login_banner(hardening_on, host, node: Host) -> None:
    if node.config.hardening.banner is None:
        pytest.skip("hardening.banner is null: the distro's files are left as they are")
    for path, net in ((hardening.ISSUE_FILE, False), (hardening.ISSUE_NET_FILE, True)):
        f = host.file(path)
        assert f.content_string == hardening.render_issue(node.config, net=net), path
        assert (f.user, f.group, f.mode) == ("root", "root", 0o644), path


# --- logins ----------------------------------------------------------------------------------


def test_login_defs(hardening_on, host, node: Host) -> None:
    """The last line of each key wins (shadow's getdef reads them in order)."""
    settings: dict[str, str] = {}
    for line in host.file(hardening.LOGIN_DEFS).content_string.splitlines():
        words = line.split()
        if words and not words[0].startswith("#"):
            settings[words[0]] = " ".join(words[1:])
    wanted = hardening.login_defs(node.config)
    assert {k: settings.get(k) for k in wanted} == wanted


def test_login_shells_get_the_umask(hardening_on, host, node: Host) -> None:
    f = host.file(hardening.PROFILE_UMASK)
    assert (f.user, f.group, f.mode) == ("root", "root", 0o644)
    assert host.check_output("bash -lc umask") == "0" + node.config.hardening.login.umask


def test_accounts_with_a_password_age(hardening_on, host, node: Host, as_root) -> None:
    login = node.config.hardening.login
    want = [str(login.password_min_days), str(login.password_max_days)]
    want.append(str(login.password_warn_days))
    wrong = []
    for line in as_root("getent shadow").stdout.splitlines():
        fields = line.split(":")
        if fields[1][:1] in ("!", "*") or fields[0] == node.connection.user:
            continue  # no password (locked), or gpunode's own (a notice says why)
        if fields[3:6] != want:
            wrong.append(f"{fields[0]}: min/max/warn {fields[3:6]}")
    assert wrong == []


def test_each_login_gets_a_private_tmpdir(
    hardening_on, host, as_login, node: Host, spec: distros.DistroSpec
) -> None:
    if not node.config.hardening.login.private_tmp:
        pytest.skip("hardening.login.private_tmp is false for this host")
    if hardening_schema.PAM_TMPDIR_PACKAGE[spec.family] is None:
        pytest.skip(f"pam_tmpdir is not packaged on {spec.key} (the role says so on every run)")
    assert "pam_tmpdir.so" in host.file("/etc/pam.d/common-session").content_string
    uid = as_login("id -u")  # a login's session (sudo's has no pam_tmpdir)
    assert as_login('echo "$TMPDIR"') == f"/tmp/user/{uid}"
    assert as_login('stat -c "%u %a" "$TMPDIR"') == f"{uid} 700"


# --- kernel modules ------------------------------------------------------------------------


def test_uncommon_kernel_modules_turned_off(hardening_on, host, node: Host) -> None:
    f = host.file(hardening.MODPROBE_FILE)
    assert f.content_string == hardening.render_modprobe(node.config)
    assert (f.user, f.group, f.mode) == ("root", "root", 0o644)


def test_a_turned_off_module_would_not_load(
    hardening_on, host, node: Host, in_container: bool
) -> None:
    """What modprobe would do (-n: nothing is loaded), where this host boots its own kernel."""
    if in_container:
        pytest.skip("the kernel is the machine's underneath (the role says so on every run)")
    for module in hardening.disabled_modules(node.config):
        out = host.run(f"modprobe -n -v {module}")
        assert "install /bin/false" in out.stdout, f"{module}: {out.stdout} {out.stderr}"
        loaded = host.run(f"grep -qw '^{module.replace('-', '_')}' /proc/modules")
        assert loaded.rc != 0, f"{module} is loaded (it was before gpunode turned it off?)"


# --- OS ----------------------------------------------------------------------------------


def test_core_dumps_off(hardening_on, host, node: Host) -> None:
    if node.config.hardening.core_dumps:
        pytest.skip("hardening.core_dumps is true for this host")
    assert host.check_output("ulimit -Hc") == "0"  # this login went through pam_limits
    assert "Storage=none" in host.file(hardening.COREDUMP_DROPIN).content_string
    assert hardening.sysctl_settings(node.config).get("fs.suid_dumpable") == 0


def test_legacy_services_absent(hardening_on, host, node: Host, spec: distros.DistroSpec) -> None:
    if not node.config.hardening.remove_insecure_packages:
        pytest.skip("hardening.remove_insecure_packages is false for this host")
    names = " ".join(hardening_schema.ABSENT_PACKAGES[spec.family])
    if spec.family == "apt":  # one query for all: "name status" for those dpkg knows of
        out = host.run(f"dpkg-query -W -f '${{Package}} ${{db:Status-Status}}\\n' {names}")
        installed = [
            line.split()[0] for line in out.stdout.splitlines() if line.endswith(" installed")
        ]
    else:
        out = host.run(f"rpm -q {names}")
        installed = [line for line in out.stdout.splitlines() if "is not installed" not in line]
    assert installed == []


def test_strict_file_modes(hardening_on, host, node: Host, spec: distros.DistroSpec) -> None:
    if not node.config.hardening.strict_file_modes:
        pytest.skip("hardening.strict_file_modes is false for this host")
    entries = hardening_schema.STRICT_FILES[spec.family]
    out = host.check_output(f"stat -c '%n %U %G %a' {' '.join(e.path for e in entries)}")
    assert out.splitlines() == [f"{e.path} {e.user} {e.group} {int(e.mode, 8):o}" for e in entries]


# --- after upgrades ------------------------------------------------------------------------


def test_needrestart_restarts_daemons_after_upgrades(
    hardening_on, host, node: Host, spec: distros.DistroSpec, as_root
) -> None:
    if not node.config.hardening.restart_services:
        pytest.skip("hardening.restart_services is false for this host")
    if spec.family == "dnf" and host.run("rpm -q epel-release").rc != 0:
        pytest.skip("needrestart comes from EPEL, not set up here (the role says so every run)")
    f = host.file(hardening.NEEDRESTART_FILE)
    assert f.content_string == hardening.render_needrestart()
    assert (f.user, f.group, f.mode) == ("root", "root", 0o644)
    # batch mode, list only: reads every config file (a Perl error fails it), restarts nothing
    out = as_root("needrestart -b -r l")
    assert out.rc == 0 and "Error parsing" not in out.stderr, out.stderr
    assert "NEEDRESTART-VER:" in out.stdout


def test_package_verification_runs_and_found_nothing(
    hardening_on, host, node: Host, spec: distros.DistroSpec
) -> None:
    if node.config.hardening.verify_packages is None:
        pytest.skip("hardening.verify_packages is null for this host")
    for unit, text in hardening.render_verify_units(node.config, spec.family).items():
        assert host.file(f"/etc/systemd/system/{unit}").content_string == text, unit
    timer = host.service(hardening.VERIFY_TIMER)
    assert timer.is_enabled and timer.is_running
    # "success" also before its first run; "exit-code" once it found a changed file
    result = host.check_output(f"systemctl show -p Result --value {hardening.VERIFY_SERVICE}")
    assert result == "success", (
        f"the last package verification failed: journalctl -u {hardening.VERIFY_SERVICE}"
    )


def test_file_integrity_database_matches_the_files(
    hardening_on, host, node: Host, spec: distros.DistroSpec, as_root
) -> None:
    """AIDE's settings as gpunode renders them, its database root's alone, the daily check
    scheduled, and nothing changed since the last deploy took its own changes in."""
    if node.config.hardening.file_integrity is None:
        pytest.skip("hardening.file_integrity is null for this host")
    conf = host.file(hardening.AIDE_CONF)
    assert (conf.user, conf.group, conf.mode) == ("root", "root", 0o600)
    assert as_root(f"cat {hardening.AIDE_CONF}").stdout == hardening.render_aide(
        node.config, spec.key, spec.family
    )
    db = as_root(f"stat -c '%U %G %a' {hardening.AIDE_DIR} {hardening.AIDE_DB}").stdout
    assert db.split("\n")[:2] == ["root root 700", "root root 600"], db
    for unit, text in hardening.render_integrity_units(node.config, spec.family).items():
        assert host.file(f"/etc/systemd/system/{unit}").content_string == text, unit
    timer = host.service(hardening.INTEGRITY_TIMER)
    assert timer.is_enabled and timer.is_running
    # automatic upgrades on: their unit wants the update after them (systemd read the drop-in)
    upgrades = hardening_schema.AUTO_UPGRADE_SERVICE[spec.family]
    wants = host.check_output(f"systemctl show -p Wants --value {upgrades}").split()
    update = hardening.render_integrity_update(spec.family)
    if node.config.base.auto_updates.enabled:
        assert hardening.INTEGRITY_UPDATE_SERVICE in wants, (upgrades, wants)
        for path, text in update.items():
            assert as_root(f"cat {path}").stdout == text, path
        script = as_root(f"stat -c '%U %G %a' {hardening.INTEGRITY_UPDATE_SCRIPT}").stdout
        assert script.strip() == "root root 700", script
        result = host.check_output(
            f"systemctl show -p Result --value {hardening.INTEGRITY_UPDATE_SERVICE}"
        )
        assert result == "success", (
            f"AIDE could not take the automatic upgrades in: journalctl -u "
            f"{hardening.INTEGRITY_UPDATE_SERVICE}"
        )
    else:
        assert hardening.INTEGRITY_UPDATE_SERVICE not in wants, (upgrades, wants)
        assert not any(host.file(path).exists for path in update)
    check = as_root(hardening.integrity_check_command(spec.family))
    assert check.rc == 0, f"AIDE found differences (exit status {check.rc}):\n{check.stdout}"


def test_audit_trail_runs_with_gpunodes_rules(
    hardening_on, host, node: Host, spec: distros.DistroSpec, in_container: bool, as_root
) -> None:
    if not node.config.hardening.audit.enabled:
        pytest.skip("hardening.audit.enabled is false for this host")
    if in_container:
        pytest.skip("the kernel's audit is the machine's underneath (the role says so every run)")
    assert host.service("auditd").is_running and host.service("auditd").is_enabled
    assert as_root(f"cat {hardening.AUDIT_RULES}").stdout == hardening.render_audit_rules(
        node.config
    )
    assert as_root(f"cat {hardening.AUDITD_CONF}").stdout == hardening.render_auditd_conf(
        node.config, spec.family
    )
    listed = as_root("auditctl -l").stdout
    for path, key in hardening.audit_watches(node.config):
        assert f"-w {path} -p wa -k {key}" in listed, path
    assert "-k root-commands" in listed or "key=root-commands" in listed
    locked = as_root("auditctl -s").stdout.splitlines()
    assert ("enabled 2" in locked) == node.config.hardening.audit.immutable


# --- remote logs ---------------------------------------------------------------------------------


def test_remote_logs_forwarded_over_tls_or_not_configured(
    hardening_on, host, node: Host, spec: distros.DistroSpec, as_root
) -> None:
    """hardening.remote_logs: rsyslog runs with gpunode's drop-in (as rendered for this node),
    the CA of `ca_file` (read on this controller) and, on Debian/Ubuntu, journald's forwarding;
    rsyslogd accepts the whole configuration. Null: none of gpunode's files is there."""
    logs = node.config.hardening.remote_logs
    files = (hardening.REMOTE_LOGS_CONF, hardening.REMOTE_LOGS_CA, hardening.REMOTE_LOGS_JOURNALD)
    if logs is None:
        assert [p for p in files if host.file(p).exists] == []
        return
    wanted = {
        hardening.REMOTE_LOGS_CONF: hardening.render_remote_logs(node.config, spec.family),
        hardening.REMOTE_LOGS_CA: hardening.remote_logs_ca(node.name, logs.ca_file),
    }
    if hardening_schema.JOURNAL_TO_RSYSLOG[spec.family] == "forward":
        wanted[hardening.REMOTE_LOGS_JOURNALD] = (
            TEMPLATES / "hardening" / "journald-forward.conf"
        ).read_text()
    for path, text in wanted.items():
        f = host.file(path)
        assert (f.user, f.group, f.mode) == ("root", "root", 0o644), path
        assert f.content_string == text, path
    rsyslog = host.service("rsyslog")
    assert rsyslog.is_running and rsyslog.is_enabled
    check = as_root("rsyslogd -N1")
    assert check.rc == 0, check.stderr
