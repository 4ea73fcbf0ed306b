"""Operation tests of the base role (roles/base.py) on every distro gpunode supports.

The lab boots debian12 only; ubuntu2204, ubuntu2404 and the EL9 family (rhel9, rocky9,
alma9) are covered here instead: each test runs the whole ``base`` deploy through pyinfra's
real API (``State``, ``connect_all``, ``add_deploy``, ``run_ops``) against one host of
pyinfra's ``@fake`` connector, and asserts on the commands pyinfra sent and the files it
uploaded. The fake-host runner (``run_deploys``) and its helpers are in harness.py.

What the fake host answers:

* ``HostInfo`` (the distro check) gets what its real command prints on that distro: the
  command is run by ``sh`` here against the distro's verbatim ``/etc/os-release`` in
  ``fixtures/os-release/`` with a ``systemd-detect-virt`` stub on PATH that behaves like the
  real one (``none`` + exit status 1 on bare metal, the container type in a container).
* ``/etc/dnf/dnf.conf`` (EL9) is a real file in ``tmp_path``: gpunode's ini parser
  (gpunode/facts/ini.py, ``python3 -c``) runs for real on that copy, for the fact and the edit,
  so the tests check the file that results.
* gpunode's ``fail`` operation (``echo ... >&2; exit 1``) runs for real too.
* A few systemd answers that hold on every supported host: ``hostnamectl`` exists and
  journald is running.
* Everything else succeeds with no output: a fresh host with no packages, users or files
  (harness.py's ``converged()`` fakes a host that already has a previous run's files).

Sources of fixtures/os-release/* (each the distro's /usr/lib/os-release, verbatim):
debian12: base-files 12.x of Debian 12 "bookworm" (also this machine's /etc/os-release);
ubuntu2204: base-files 12ubuntu4.x of Ubuntu 22.04.4 LTS; ubuntu2404: base-files 13ubuntu10
of Ubuntu 24.04 LTS (GA); rhel9: redhat-release 9.4 (RHEL 9.4 "Plow", e.g. the ubi9:9.4
image); rocky9: rocky-release 9.4 ("Blue Onyx"); alma9: almalinux-release 9.4 ("Seafoam
Ocelot"). Contents cross-checked against public copies quoted in other projects' tests and
docs. fixtures/dnf/dnf.conf is the stock /etc/dnf/dnf.conf of dnf 4 on EL9 (dnf-data).
"""

from __future__ import annotations

import functools
import hashlib
import re
import shlex
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import (
    ALL,
    APT,
    DNF,
    FIXTURES,
    HOST,
    Handler,
    Response,
    Run,
    content_lines,
    converged,
    host_info_output,
    run_deploys,
    run_sh,
)

from gpunode.base import SECURITY_LIST
from gpunode.config import load
from gpunode.facts.server import AptSources, HostInfo
from gpunode.facts.sudo import SudoersDropin
from gpunode.operations.packages import apt_update_command
from gpunode.schema.base import DEFAULT_HOLD
from gpunode.schema.node import NodeConfig
from gpunode.schema.types import ConfigError
from roles.base import base

STOCK_DNF_CONF = (FIXTURES / "dnf" / "dnf.conf").read_text()

PROXY = "http://proxy.internal.example:3142"
OLD_PROXY = "http://old-proxy.example:3128"
KEY_BLOB = "AAAAC3NzaC1lZDI1NTE5AAAAIGdwdW5vZGUtdGVzdC1rZXktbm90LWEtcmVhbC1vbmU"
KEY = f"ssh-ed25519 {KEY_BLOB} alice@laptop"

# What each distro must get, written out by hand (not read from gpunode/schema/distros.py, so a
# wrong row in that table fails here).
APT_PACKAGES = {
    "ca-certificates",
    "curl",
    "gnupg",
    "kmod",
    "pciutils",
    "chrony",
    "unattended-upgrades",
    "jq",
}
DNF_PACKAGES = {
    "ca-certificates",
    "curl",
    "gnupg2",
    "kmod",
    "pciutils",
    "chrony",
    "dnf-automatic",
    "jq",
}


@dataclass(frozen=True)
class Expect:
    family: str
    os_id: str
    version_id: str
    packages: set[str]
    chrony_conf: str
    driftfile: str
    chrony_service: str


_DEB = dict(
    family="apt",
    packages=APT_PACKAGES,
    chrony_conf="/etc/chrony/chrony.conf",
    driftfile="/var/lib/chrony/chrony.drift",
    chrony_service="chrony.service",
)
_EL9 = dict(
    family="dnf",
    version_id="9.4",
    packages=DNF_PACKAGES,
    chrony_conf="/etc/chrony.conf",
    driftfile="/var/lib/chrony/drift",
    chrony_service="chronyd.service",
)
EXPECT = {
    "debian12": Expect(os_id="debian", version_id="12", **_DEB),
    "ubuntu2204": Expect(os_id="ubuntu", version_id="22.04", **_DEB),
    "ubuntu2404": Expect(os_id="ubuntu", version_id="24.04", **_DEB),
    "rhel9": Expect(os_id="rhel", **_EL9),
    "rocky9": Expect(os_id="rocky", **_EL9),
    "alma9": Expect(os_id="almalinux", **_EL9),
}

APT_PROXY_FILE = "/etc/apt/apt.conf.d/01gpunode-proxy"
APT_LOCK_FILE = "/etc/apt/apt.conf.d/01gpunode-lock-timeout"
APT_PERIODIC_FILE = "/etc/apt/apt.conf.d/20auto-upgrades"
APT_HOLD_FILE = "/etc/apt/apt.conf.d/52gpunode-unattended-upgrades"
DNF_AUTOMATIC_FILE = "/etc/dnf/automatic.conf"
SUDOERS_FILE = "/etc/sudoers.d/90-gpunode-admins"
SUDOERS_STAGED = "/etc/sudoers.d/.90-gpunode-admins.gpunode-new"  # sudo skips names with a "."
JOURNALD_FILE = "/etc/systemd/journald.conf.d/50-gpunode.conf"
KEYS_FILE = "/home/alice/.ssh/authorized_keys"
SOURCES_LIST = "/etc/apt/sources.list"
UBUNTU_SOURCES = "/etc/apt/sources.list.d/ubuntu.sources"


# --- the fake host ---------------------------------------------------------------------


def live_file(remote: str, local: Path) -> Handler:
    """Run gpunode's ini parser (``python3 -c SCRIPT get|set|unset PATH ...``) on ``remote``
    for real, on ``local``."""

    def handler(command: str) -> Response | None:
        if f" {remote} " not in command or not command.startswith("python3 -c "):
            return None
        return run_sh(command.replace(f" {remote} ", f" {shlex.quote(str(local))} "))

    return handler


APT_SOURCES = FIXTURES / "apt-sources"
# each apt distro's stock sources (fixtures/apt-sources/README.md)
STOCK_SOURCES = {"debian12": "debian12", "ubuntu2204": "ubuntu2204", "ubuntu2404": "ubuntu2404"}


def apt_sources_output(etc_apt: Path) -> Response:
    """What the AptSources fact's command prints on a host whose /etc/apt/ is ``etc_apt``: the
    real command, run by sh on that directory, its paths shown as the host's."""
    command = AptSources().command()
    assert "/etc/apt/" in command
    done = run_sh(command.replace("/etc/apt/", f"{shlex.quote(str(etc_apt))}/"))
    done["stdout"] = done["stdout"].replace(f"{etc_apt}/", "/etc/apt/")
    return done


def apt_sources_on(etc_apt: Path) -> Handler:
    def handler(command: str) -> Response | None:
        return apt_sources_output(etc_apt) if command == AptSources().command() else None

    return handler


def run_base(
    config: NodeConfig, os_release: str, container: str = "", handlers: Iterable[Handler] = ()
) -> Run:
    responses: dict[Any, Response] = {
        HostInfo().command(): list(host_info_output(os_release, container)),
        "command -v hostnamectl": "/usr/bin/hostnamectl",
        re.compile(r"systemctl show .* systemd-journald\.service \)"): [
            "Id=systemd-journald.service",
            "SubState=running",
        ],
    }
    if os_release in STOCK_SOURCES:  # a test's own apt sources come first
        handlers = [*handlers, apt_sources_on(APT_SOURCES / STOCK_SOURCES[os_release])]
    return run_deploys(config, responses, [base], handlers)


def node_config(distro: str, **base_overrides: Any) -> NodeConfig:
    """A host's NodeConfig, through gpunode's real loading and validation."""
    base_config: dict[str, Any] = {
        "hostname": HOST,
        "apt_proxy": PROXY,
        "packages": ["jq"],
        "ntp_servers": ["0.pool.ntp.org", "ntp1.example.net"],
        "admin_users": [{"name": "alice", "ssh_keys": [KEY]}],
        "admin_group": "gpuadmins",
        "journald": {
            "system_max_use": "4G",
            "max_retention_sec": "2week",
            "rate_limit_burst": 5000,
        },
    }
    base_config.update(base_overrides)
    raw = {
        # the firewall (on by default) is not this role's: off, so no admin_cidrs are needed
        "defaults": {"distro": distro, "base": base_config, "firewall": {"enabled": False}},
        "hosts": {HOST: {"connection": {"address": "192.0.2.10"}}},
    }
    return load(raw, source="test_base_role").hosts[HOST].config


@functools.cache
def fresh(distro: str, container: str = "") -> Run:
    """The standard config deployed on a fresh host that runs the declared distro."""
    with tempfile.TemporaryDirectory() as tmp:
        handlers = []
        if EXPECT[distro].family == "dnf":
            conf = Path(tmp) / "dnf.conf"
            conf.write_text(STOCK_DNF_CONF)
            handlers.append(live_file("/etc/dnf/dnf.conf", conf))
        return run_base(node_config(distro), distro, container, handlers)


# --- parsing what was sent ---------------------------------------------------------------


def installed_packages(run: Run, family: str) -> set[str]:
    if family == "apt":
        installs = run.grep(r"\bapt-get\b.*\binstall\b")
        assert len(installs) == 1, installs
        args = installs[0].split(" install ", 1)[1].split()
    else:
        installs = run.grep(r"^dnf\b.*\binstall\b")
        assert len(installs) == 1, installs
        args = installs[0].split(" install ", 1)[1].split()
    return {a for a in args if not a.startswith("-")}


def apt_hold_entries(text: str) -> list[str]:
    body = re.search(r"Unattended-Upgrade::Package-Blacklist \{\n(.*?)\n\};", text, re.S)
    assert body, text
    return re.findall(r'^\s*"([^"]*)";\s*$', body[1], re.M)


def ini_value(text: str, key: str) -> str:
    values = re.findall(rf"^\s*{re.escape(key)}\s*=\s*(.*?)\s*$", text, re.M)
    assert len(values) == 1, (key, values)
    return values[0]


# --- the distro check ----------------------------------------------------------------------


@pytest.mark.parametrize("container", ["", "systemd-nspawn"])
@pytest.mark.parametrize("distro", ALL)
def test_host_info_reads_the_real_os_release(distro: str, container: str) -> None:
    info = HostInfo().process(list(host_info_output(distro, container)))
    expect = EXPECT[distro]
    assert info == {"id": expect.os_id, "version_id": expect.version_id, "container": container}


@pytest.mark.parametrize("distro", ALL)
def test_declared_distro_passes_the_check(distro: str) -> None:
    run = fresh(distro)
    assert not run.failed
    assert not run.grep(r"exit 1$")


@pytest.mark.parametrize(
    "declared, actual, found",
    [
        ("rhel9", "ubuntu2204", "ubuntu 22.04"),
        ("ubuntu2404", "ubuntu2204", "ubuntu 22.04"),
        ("ubuntu2204", "ubuntu2404", "ubuntu 24.04"),
        ("debian12", "rhel9", "rhel 9.4"),
        ("rocky9", "alma9", "almalinux 9.4"),
        ("alma9", "rocky9", "rocky 9.4"),
        ("rhel9", "debian12", "debian 12"),
    ],
)
def test_distro_mismatch_fails_the_host_before_any_change(
    declared: str, actual: str, found: str
) -> None:
    run = run_base(node_config(declared), actual)

    assert run.failed
    failures = [(cmd, out) for cmd, ok, out in run.results if not ok]
    assert len(failures) == 1
    stderr = failures[0][1].stderr
    assert f"declared {declared}" in stderr
    assert f"the host runs {found}" in stderr
    # Nothing was planned past the check: no package manager, no file, no service.
    assert not run.grep(r"apt-get|\bdpkg\b|\bdnf\b|\brpm\b|systemctl (start|enable|restart)")
    assert run.uploads == []
    assert all("Check the host runs the declared distro" in label for label in run.op_labels)


# --- packages ------------------------------------------------------------------------------


@pytest.mark.parametrize("distro", ALL)
def test_packages(distro: str) -> None:
    run, expect = fresh(distro), EXPECT[distro]

    assert installed_packages(run, expect.family) == expect.packages
    if expect.family == "apt":
        (install,) = run.grep(r"\bapt-get\b.*\binstall\b")
        assert "DEBIAN_FRONTEND=noninteractive" in install
        assert "--no-install-recommends" in install
        # a fresh host has none of them: the lists are refreshed first
        assert run.commands.index(apt_update_command()) < run.commands.index(install)
        assert not run.grep(r"\bdnf\b|\brpm\b")
    else:
        (install,) = run.grep(r"^dnf\b.*\binstall\b")
        assert install.startswith("dnf install -y ")
        assert not run.grep(r"apt-get|\bdpkg\b")


# --- files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("distro", ALL)
def test_files_written(distro: str) -> None:
    run, expect = fresh(distro), EXPECT[distro]
    common = {KEYS_FILE, SUDOERS_STAGED, JOURNALD_FILE, expect.chrony_conf}
    if expect.family == "apt":
        wanted = common | {APT_PROXY_FILE, APT_PERIODIC_FILE, APT_HOLD_FILE, APT_LOCK_FILE}
    else:
        wanted = common | {DNF_AUTOMATIC_FILE}
    assert set(run.files) == wanted
    assert len(run.uploads) == len(wanted)  # each once


@pytest.mark.parametrize("distro", APT)
def test_apt_proxy(distro: str) -> None:
    proxy_conf = fresh(distro).files[APT_PROXY_FILE]
    assert content_lines(proxy_conf) == [
        f'Acquire::http::Proxy "{PROXY}";',
        f'Acquire::https::Proxy "{PROXY}";',
    ]
    assert fresh(distro).grep(rf"^chmod 644 {APT_PROXY_FILE}$")


@pytest.mark.parametrize("distro", APT)
def test_apt_waits_for_the_package_lock_from_its_first_command(distro: str) -> None:
    """A deploy that meets unattended-upgrades at work waits for it (up to 15 minutes) instead
    of failing that host: the setting is in place before the base role's first apt command."""
    run = fresh(distro)
    assert content_lines(run.files[APT_LOCK_FILE]) == ['DPkg::Lock::Timeout "900";']
    assert run.grep(rf"^chmod 644 {APT_LOCK_FILE}$")
    written = run.commands.index(f"chmod 644 {APT_LOCK_FILE}")
    apt_commands = [i for i, c in enumerate(run.commands) if re.search(r"\bapt-get\b", c)]
    assert apt_commands and written < min(apt_commands)


@pytest.mark.parametrize("distro", DNF)
def test_dnf_hosts_get_no_apt_lock_setting(distro: str) -> None:
    assert APT_LOCK_FILE not in fresh(distro).files


@pytest.mark.parametrize("distro", APT)
def test_no_apt_proxy_removes_the_file(distro: str) -> None:
    run = run_base(
        node_config(distro, apt_proxy=None),
        distro,
        handlers=[converged({APT_PROXY_FILE: "old"}, {})],
    )
    assert APT_PROXY_FILE not in run.files
    assert run.grep(rf"^rm -f {APT_PROXY_FILE}$")


@pytest.mark.parametrize(
    "before, proxy, after",
    [
        pytest.param(STOCK_DNF_CONF, PROXY, STOCK_DNF_CONF + f"proxy={PROXY}\n", id="add"),
        pytest.param(
            STOCK_DNF_CONF + f"proxy={OLD_PROXY}\n",
            PROXY,
            STOCK_DNF_CONF + f"proxy={PROXY}\n",
            id="replace",
        ),
        pytest.param(
            STOCK_DNF_CONF + f"proxy={PROXY}\n",
            PROXY,
            STOCK_DNF_CONF + f"proxy={PROXY}\n",
            id="keep",
        ),
        pytest.param(STOCK_DNF_CONF + f"proxy={OLD_PROXY}\n", None, STOCK_DNF_CONF, id="remove"),
        pytest.param(STOCK_DNF_CONF, None, STOCK_DNF_CONF, id="none"),
        pytest.param(  # an earlier run's drift: the key twice, one of them a continued value
            f"[main]\nproxy={OLD_PROXY}\n  sslverify=0\ngpgcheck=1\nproxy={PROXY}\n"
            f"[other]\nproxy={OLD_PROXY}\n",
            PROXY,
            f"[main]\nproxy={PROXY}\ngpgcheck=1\n[other]\nproxy={OLD_PROXY}\n",
            id="duplicates-in-main-only",
        ),
        pytest.param(
            "# comment kept\n[main]\n; another\ngpgcheck=1\n\n[updates]\nenabled=1\n",
            PROXY,
            f"# comment kept\n[main]\n; another\ngpgcheck=1\nproxy={PROXY}\n\n[updates]\n"
            "enabled=1\n",
            id="comments-and-sections",
        ),
    ],
)
@pytest.mark.parametrize("distro", DNF)
def test_dnf_proxy_set_through_the_ini_parser(
    distro: str, before: str, proxy: str | None, after: str, tmp_path: Path
) -> None:
    conf = tmp_path / "dnf.conf"
    conf.write_text(before)
    conf.chmod(0o640)
    handlers = [live_file("/etc/dnf/dnf.conf", conf)]

    run = run_base(node_config(distro, apt_proxy=proxy), distro, handlers=handlers)

    assert conf.read_text() == after
    edits = run.grep(r"(?s)^python3 -c .* (set|unset) /etc/dnf/dnf\.conf main proxy")
    assert len(edits) == (before != after)
    assert not run.grep(r"^(echo|sed) .*/etc/dnf/dnf\.conf")  # no line appended or sed-edited
    assert "/etc/dnf/dnf.conf" not in run.files  # edited in place, never uploaded whole
    assert conf.stat().st_mode & 0o777 == 0o640  # the file's mode is kept

    # converged: the next run finds the value through the parser and changes nothing
    again = run_base(node_config(distro, apt_proxy=proxy), distro, handlers=handlers)
    assert not again.grep(r"(?s)^python3 -c .* (set|unset) ")
    assert again.grep(r"(?s)^python3 -c .* get /etc/dnf/dnf\.conf main proxy$")
    assert conf.read_text() == after


HOSTILE_PROXY = "http://proxy.example.com:3128\nsslverify=0"


@pytest.mark.parametrize("distro", DNF)
def test_a_hostile_dnf_proxy_cannot_add_a_key(distro: str, tmp_path: Path) -> None:
    # at config load: refused, naming the key
    with pytest.raises(ConfigError, match=r"base\.apt_proxy"):
        node_config(distro, apt_proxy=HOSTILE_PROXY)
    # past config load (a config built in code, not loaded): the operation refuses it before
    # any command runs, and dnf.conf is as it was
    conf = tmp_path / "dnf.conf"
    conf.write_text(STOCK_DNF_CONF)
    good = node_config(distro)
    hostile = good.model_copy(
        update={"base": good.base.model_copy(update={"apt_proxy": HOSTILE_PROXY})}
    )
    with pytest.raises(ConfigError, match="control character"):
        run_base(hostile, distro, handlers=[live_file("/etc/dnf/dnf.conf", conf)])
    assert conf.read_text() == STOCK_DNF_CONF
    assert "sslverify" not in conf.read_text()


@pytest.mark.parametrize("distro", ALL)
def test_chrony(distro: str) -> None:
    run, expect = fresh(distro), EXPECT[distro]
    conf = run.files[expect.chrony_conf]
    assert content_lines(conf) == [
        "pool 0.pool.ntp.org iburst",
        "server ntp1.example.net iburst",
        f"driftfile {expect.driftfile}",
        "makestep 1.0 3",
        "rtcsync",
        "leapsectz right/UTC",
        "logdir /var/log/chrony",
    ]
    other = {"/etc/chrony/chrony.conf", "/etc/chrony.conf"} - {expect.chrony_conf}
    assert not other & set(run.files)


@pytest.mark.parametrize("distro", ALL)
def test_admin_group_sudo_and_user(distro: str) -> None:
    run = fresh(distro)
    assert content_lines(run.files[SUDOERS_STAGED]) == ["%gpuadmins ALL=(ALL:ALL) NOPASSWD: ALL"]
    assert SUDOERS_FILE not in run.files  # never written in place
    (create,) = run.grep(rf"^install .* {re.escape(SUDOERS_STAGED)}$")
    assert create == f"install -m 440 -o root -g root /dev/null {SUDOERS_STAGED}"
    assert run.grep(r"^groupadd gpuadmins$")
    (useradd,) = run.grep(r"^useradd ")
    assert re.search(r"(^| )-G gpuadmins( |$)", useradd) and useradd.endswith(" alice")
    assert run.files[KEYS_FILE].strip() == KEY
    assert run.grep(rf"^chmod 600 {KEYS_FILE}$")


def test_sudo_with_password() -> None:
    run = run_base(node_config("rhel9", sudo_nopasswd=False), "rhel9")
    assert content_lines(run.files[SUDOERS_STAGED]) == ["%gpuadmins ALL=(ALL:ALL) ALL"]


@pytest.mark.parametrize("distro", ["debian12", "rhel9"])
def test_sudoers_is_checked_by_visudo_before_it_takes_effect(distro: str) -> None:
    run = fresh(distro)
    (script,) = run.grep(rf"visudo -c -f {re.escape(SUDOERS_STAGED)}")
    steps = script.splitlines()
    check = steps.index(f"if ! /usr/sbin/visudo -c -f {SUDOERS_STAGED} >/dev/null; then")
    move = steps.index(f"mv -f {SUDOERS_STAGED} {SUDOERS_FILE}")
    whole = steps.index("if ! /usr/sbin/visudo -c >/dev/null; then")
    assert check < move < whole
    assert steps[check + 1] == f"  rm -f {SUDOERS_STAGED}"  # refused: the staged file goes
    assert steps[check + 3] == "  exit 1"  # ... and the op fails before the move
    # the empty file with its final owner and mode comes first, then content, then the check
    create = run.commands.index(f"install -m 440 -o root -g root /dev/null {SUDOERS_STAGED}")
    assert create < run.commands.index(script)


def sudoers_host(files: dict[str, str]) -> Handler:
    """A host that has these sudoers drop-ins, root:root 0440 (the SudoersDropin fact)."""

    def handler(command: str) -> Response | None:
        for path, content in files.items():
            if command == SudoersDropin().command(path):
                digest = hashlib.sha256(content.encode()).hexdigest()
                return ["root root 440", f"{digest}  {path}"]
        return None

    return handler


def test_converged_sudoers_is_left_alone() -> None:
    content = fresh("debian12").files[SUDOERS_STAGED]
    live = sudoers_host({SUDOERS_FILE: content})
    run = run_base(node_config("debian12"), "debian12", handlers=[live])
    assert not run.grep("visudo") and SUDOERS_STAGED not in run.files
    changed = run_base(node_config("debian12", sudo_nopasswd=False), "debian12", handlers=[live])
    assert content_lines(changed.files[SUDOERS_STAGED]) == ["%gpuadmins ALL=(ALL:ALL) ALL"]
    assert changed.grep("visudo -c -f")


@pytest.mark.parametrize("distro", ALL)
def test_hostname(distro: str) -> None:
    assert fresh(distro).grep(rf"^hostnamectl set-hostname {HOST}$")


@pytest.mark.parametrize("distro", ALL)
def test_journald_limits(distro: str) -> None:
    run = fresh(distro)
    assert content_lines(run.files[JOURNALD_FILE]) == [
        "[Journal]",
        "Storage=persistent",
        "SystemMaxUse=4G",
        "MaxRetentionSec=2week",
        "RateLimitBurst=5000",
    ]
    assert run.grep(r"^mkdir -p /var/log/journal$")
    assert run.grep(r"^chmod 2755 /var/log/journal$")
    # the new limits apply: journald (running) is restarted because the file changed
    assert run.grep(r"^systemctl restart systemd-journald\.service$")


@pytest.mark.parametrize("distro", ALL)
def test_hold_list(distro: str) -> None:
    run, expect = fresh(distro), EXPECT[distro]
    if expect.family == "apt":
        assert apt_hold_entries(run.files[APT_HOLD_FILE]) == list(DEFAULT_HOLD)
        periodic = content_lines(run.files[APT_PERIODIC_FILE])
        assert periodic == [
            'APT::Periodic::Update-Package-Lists "1";',
            'APT::Periodic::Unattended-Upgrade "1";',
        ]
        assert "Origins-Pattern" not in run.files[APT_HOLD_FILE]  # security_only: the default
    else:
        conf = run.files[DNF_AUTOMATIC_FILE]
        excluded = ini_value(conf, "excludepkgs").split()
        assert excluded == [
            "linux-image-*",
            "linux-headers-*",
            "linux-modules-*",
            "kernel*",
            "nvidia-*",
            "libnvidia-*",
            "cuda-*",
            "libcudnn*",
            "datacenter-gpu-manager*",
        ]
        assert ini_value(conf, "upgrade_type") == "security"
        assert ini_value(conf, "apply_updates") == "yes"
        assert ini_value(conf, "reboot") == "never"


@pytest.mark.parametrize(
    "hold, apt_entries, dnf_globs",
    [
        (
            ["linux-image-", "nvidia-*", "cuda-12-*"],
            ["linux-image-", "nvidia-.*", "cuda-12-.*"],
            ["linux-image-*", "nvidia-*", "cuda-12-*"],
        )
    ],
)
@pytest.mark.parametrize("distro", ALL)
def test_hold_list_change_changes_only_the_hold_list_file(
    distro: str, hold: list[str], apt_entries: list[str], dnf_globs: list[str]
) -> None:
    first = fresh(distro)
    modes = {m[2]: m[1] for c in first.commands if (m := re.match(r"chmod (\d+) (\S+)$", c))}
    host = converged(first.files, modes)
    sudoers = sudoers_host({SUDOERS_FILE: first.files[SUDOERS_STAGED]})

    unchanged = run_base(node_config(distro), distro, handlers=[host, sudoers])
    changed = run_base(
        node_config(distro, auto_updates={"hold": hold}), distro, handlers=[host, sudoers]
    )

    assert unchanged.uploads == []  # converged: nothing to write
    hold_file = APT_HOLD_FILE if EXPECT[distro].family == "apt" else DNF_AUTOMATIC_FILE
    assert list(changed.files) == [hold_file]
    if EXPECT[distro].family == "apt":
        assert apt_hold_entries(changed.files[hold_file]) == apt_entries
    else:
        assert ini_value(changed.files[hold_file], "excludepkgs").split() == dnf_globs
        # the rest of automatic.conf is as before
        strip = re.compile(r"^excludepkgs = .*$", re.M)
        assert strip.sub("", changed.files[hold_file]) == strip.sub("", first.files[hold_file])
    # an unchanged chrony.conf does not restart chrony
    chrony = EXPECT[distro].chrony_service
    assert not changed.grep(rf"systemctl restart {chrony}")
    assert not changed.grep(r"systemctl restart systemd-journald")


@pytest.mark.parametrize("distro", APT)
def test_apt_hold_entries_are_regexes_matching_the_held_packages(distro: str) -> None:
    held = {
        "libstdc++*": "libstdc++6",
        "cuda-12.4*": "cuda-12.4-runtime",
        "nvidia-*": "nvidia-dkms",
    }
    run = run_base(node_config(distro, auto_updates={"hold": list(held)}), distro)
    entries = apt_hold_entries(run.files[APT_HOLD_FILE])
    assert len(entries) == len(held)
    for entry, package in zip(entries, held.values(), strict=True):
        assert re.match(entry, package)  # unattended-upgrades matches entries with re.match
    assert not re.match(entries[1], "cuda-1204")  # a '.' in a pattern is a literal dot


# --- services --------------------------------------------------------------------------------


@pytest.mark.parametrize("distro", ALL)
def test_services_on_bare_metal(distro: str) -> None:
    run, expect = fresh(distro, container=""), EXPECT[distro]
    chrony = expect.chrony_service
    assert run.grep(rf"^systemctl start {chrony}$")
    assert run.grep(rf"^systemctl enable {chrony}$")
    other = ({"chrony.service", "chronyd.service"} - {chrony}).pop()
    assert not run.grep(re.escape(other))
    if expect.family == "dnf":
        assert run.grep(r"^systemctl enable dnf-automatic\.timer$")
        assert run.grep(r"^systemctl start dnf-automatic\.timer$")
    else:
        assert not run.grep("dnf-automatic")


@pytest.mark.parametrize("distro", ALL)
def test_services_in_a_container(distro: str) -> None:
    run, expect = fresh(distro, container="systemd-nspawn"), EXPECT[distro]
    chrony = expect.chrony_service
    assert run.grep(rf"^systemctl enable {chrony}$")
    assert not run.grep(rf"^systemctl (start|restart|reload) {chrony}$")
    assert not run.failed
    if expect.family == "dnf":
        assert run.grep(r"^systemctl enable dnf-automatic\.timer$")


def test_auto_updates_disabled_stops_the_dnf_timer() -> None:
    run = run_base(node_config("rhel9", auto_updates={"enabled": False}), "rhel9")
    assert ini_value(run.files[DNF_AUTOMATIC_FILE], "apply_updates") == "no"
    assert not run.grep(r"systemctl (start|enable) dnf-automatic")


# --- apt mirror ---------------------------------------------------------------------------


DEBIAN_COMPONENTS = "main contrib non-free non-free-firmware"
UBUNTU_COMPONENTS = "main restricted universe multiverse"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
UBUNTU_KEYRING = "/usr/share/keyrings/ubuntu-archive-keyring.gpg"


def sources_list_entries(text: str) -> list[tuple[str, str, str, str]]:
    entries = []
    for line in content_lines(text):
        m = re.fullmatch(r"deb \[signed-by=(\S+)\] (\S+) (\S+) (.+)", line)
        assert m, line
        entries.append((m[1], m[2], m[3], m[4]))
    return entries


@pytest.mark.parametrize(
    "distro, mirror, entries",
    [
        pytest.param(
            "debian12",
            "http://deb.example.net/debian/",
            [
                (DEBIAN_KEYRING, "http://deb.example.net/debian", "bookworm", DEBIAN_COMPONENTS),
                (
                    DEBIAN_KEYRING,
                    "http://deb.example.net/debian",
                    "bookworm-updates",
                    DEBIAN_COMPONENTS,
                ),
                (
                    DEBIAN_KEYRING,
                    "http://deb.example.net/debian-security",
                    "bookworm-security",
                    DEBIAN_COMPONENTS,
                ),
            ],
            id="debian12",
        ),
        pytest.param(
            "debian12",
            "http://debian.example.net/debian",
            [
                (DEBIAN_KEYRING, "http://debian.example.net/debian", "bookworm", DEBIAN_COMPONENTS),
                (
                    DEBIAN_KEYRING,
                    "http://debian.example.net/debian",
                    "bookworm-updates",
                    DEBIAN_COMPONENTS,
                ),
                (
                    DEBIAN_KEYRING,
                    "http://debian.example.net/debian-security",
                    "bookworm-security",
                    DEBIAN_COMPONENTS,
                ),
            ],
            id="debian12-host-named-debian",
        ),
        pytest.param(
            "ubuntu2204",
            "http://ubuntu.example.net/ubuntu",
            [
                (UBUNTU_KEYRING, "http://ubuntu.example.net/ubuntu", suite, UBUNTU_COMPONENTS)
                for suite in ("jammy", "jammy-updates", "jammy-security")
            ],
            id="ubuntu2204",
        ),
    ],
)
def test_apt_mirror_one_line_sources(distro: str, mirror: str, entries: list) -> None:
    run = run_base(node_config(distro, apt_mirror=mirror), distro)
    assert sources_list_entries(run.files[SOURCES_LIST]) == entries
    assert UBUNTU_SOURCES not in run.files
    assert run.grep(rf"^chmod 644 {SOURCES_LIST}$")


def test_apt_mirror_deb822_sources_on_ubuntu2404() -> None:
    run = run_base(
        node_config("ubuntu2404", apt_mirror="http://ubuntu.example.net/ubuntu/"), "ubuntu2404"
    )
    fields = dict(line.split(": ", 1) for line in content_lines(run.files[UBUNTU_SOURCES]))
    assert fields == {
        "Types": "deb",
        "URIs": "http://ubuntu.example.net/ubuntu",
        "Suites": "noble noble-updates noble-security",
        "Components": UBUNTU_COMPONENTS,
        "Signed-By": UBUNTU_KEYRING,
    }
    assert SOURCES_LIST not in run.files


@pytest.mark.parametrize("distro", APT)
def test_no_mirror_keeps_the_distro_sources(distro: str) -> None:
    run = fresh(distro)
    assert not {SOURCES_LIST, UBUNTU_SOURCES} & set(run.files)
    # only read (the AptSources fact), never written or removed
    touched = [c for c in run.commands if re.search(r"/etc/apt/sources\.list(?!\.d/gpunode)", c)]
    assert touched == [AptSources().command()], touched


# --- the security suite ----------------------------------------------------------------------


def test_apt_sources_fact_reads_both_formats() -> None:
    def read(name: str) -> list[dict[str, Any]]:
        done = apt_sources_output(APT_SOURCES / name)
        assert done["success"], done
        return AptSources().process(done["stdout"].splitlines())

    assert read("debian12-debootstrap") == [
        {
            "file": SOURCES_LIST,
            "uris": ["http://deb.debian.org/debian"],
            "suites": ["bookworm"],
            "components": ["main"],
        }
    ]
    debian = read("debian12")
    assert [(e["file"], e["suites"], e["components"]) for e in debian] == [
        ("/etc/apt/sources.list.d/debian.sources", ["bookworm", "bookworm-updates"], ["main"]),
        ("/etc/apt/sources.list.d/debian.sources", ["bookworm-security"], ["main"]),
    ]
    assert debian[1]["uris"] == ["http://deb.debian.org/debian-security"]
    jammy = read("ubuntu2204")
    assert len(jammy) == 10 and {e["file"] for e in jammy} == {SOURCES_LIST}
    assert jammy[-1] == {
        "file": SOURCES_LIST,
        "uris": ["http://security.ubuntu.com/ubuntu/"],
        "suites": ["jammy-security"],
        "components": ["multiverse"],
    }
    noble = read("ubuntu2404")
    assert [e["suites"] for e in noble] == [
        ["noble", "noble-updates", "noble-backports"],
        ["noble-security"],
    ]
    assert all(e["components"] == UBUNTU_COMPONENTS.split() for e in noble)


def test_apt_sources_fact_skips_what_apt_skips() -> None:
    lines = [
        "==> /etc/apt/sources.list",
        "deb-src http://deb.debian.org/debian bookworm main",
        "# deb http://deb.debian.org/debian-security bookworm-security main",
        "deb [ arch=amd64 signed-by=/k.gpg ] http://x.example/debian bookworm main contrib # note",
        "==> /etc/apt/sources.list.d/off.sources",
        "Types: deb",
        "URIs: http://deb.debian.org/debian-security",
        "Suites: bookworm-security",
        "Components: main",
        "Enabled: no",
        "",
        "Types: deb-src deb",
        "URIs: http://a.example/debian",
        "Suites: bookworm",
        "  bookworm-updates",
        "Components: main",
    ]
    assert AptSources().process(lines) == [
        {
            "file": SOURCES_LIST,
            "uris": ["http://x.example/debian"],
            "suites": ["bookworm"],
            "components": ["main", "contrib"],
        },
        {
            "file": "/etc/apt/sources.list.d/off.sources",
            "uris": ["http://a.example/debian"],
            "suites": ["bookworm", "bookworm-updates"],
            "components": ["main"],
        },
    ]


def test_a_debootstrapped_debian_gets_the_security_suite() -> None:
    run = run_base(
        node_config("debian12"),
        "debian12",
        handlers=[apt_sources_on(APT_SOURCES / "debian12-debootstrap")],
    )
    assert not run.failed
    assert sources_list_entries(run.files[SECURITY_LIST]) == [
        (DEBIAN_KEYRING, "http://deb.debian.org/debian-security", "bookworm-security", "main")
    ]
    assert run.grep(rf"^chmod 644 {re.escape(SECURITY_LIST)}$")
    assert run.grep(rf"^chown root:root {re.escape(SECURITY_LIST)}$")
    # the lists are refreshed after the source is added, before anything is installed
    update = max(i for i, c in enumerate(run.commands) if re.search(r"apt-get .*update", c))
    written = run.commands.index(f"chmod 644 {SECURITY_LIST}")  # right after its upload
    install = min(i for i, c in enumerate(run.commands) if re.search(r"apt-get .*install", c))
    assert written < update < install


@pytest.mark.parametrize("distro", APT)
def test_stock_sources_with_a_security_suite_get_nothing_added(distro: str) -> None:
    run = fresh(distro)
    assert SECURITY_LIST not in run.files
    changes = [c for c in run.commands if re.match(rf"(chmod|chown|rm|mv) .*{SECURITY_LIST}", c)]
    assert changes == []  # a fresh host has no file of gpunode's to remove either


def test_the_added_source_follows_the_hosts_components_and_goes_when_not_needed(
    tmp_path: Path,
) -> None:
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list").write_text(
        "deb http://deb.debian.org/debian bookworm main non-free-firmware\n"
        "deb http://deb.debian.org/debian bookworm-updates main contrib\n"
    )
    ours = "# an older version\ndeb http://deb.debian.org/debian-security bookworm-security main\n"
    (etc / "sources.list.d" / "gpunode-security.list").write_text(ours)
    run = run_base(node_config("debian12"), "debian12", handlers=[apt_sources_on(etc)])
    # gpunode's own file does not count as the host having the suite
    assert sources_list_entries(run.files[SECURITY_LIST]) == [
        (
            DEBIAN_KEYRING,
            "http://deb.debian.org/debian-security",
            "bookworm-security",
            "main non-free-firmware",
        )
    ]
    # the admins add the suite themselves: gpunode's file goes
    (etc / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n"
        "Components: main\n"
    )
    present = converged({SECURITY_LIST: ours}, {SECURITY_LIST: "644"})
    run = run_base(node_config("debian12"), "debian12", handlers=[apt_sources_on(etc), present])
    assert SECURITY_LIST not in run.files
    assert run.grep(rf"^rm -f {re.escape(SECURITY_LIST)}$")


def test_a_mirror_takes_the_added_source_away(tmp_path: Path) -> None:
    present = converged({SECURITY_LIST: "deb x bookworm-security main\n"}, {SECURITY_LIST: "644"})
    run = run_base(
        node_config("debian12", apt_mirror="http://deb.example.net/debian"),
        "debian12",
        handlers=[present],
    )
    assert run.grep(rf"^rm -f {re.escape(SECURITY_LIST)}$")
    assert not [c for c in run.commands if c == AptSources().command()]  # not even read


def test_a_component_that_is_not_a_plain_name_fails_the_host(tmp_path: Path, caplog) -> None:
    etc = tmp_path / "apt"
    etc.mkdir()
    (etc / "sources.list").write_text("deb http://deb.debian.org/debian bookworm main $(reboot)\n")
    run = run_base(node_config("debian12"), "debian12", handlers=[apt_sources_on(etc)])
    assert run.failed
    assert SECURITY_LIST not in run.files
    said = [r.getMessage() for r in caplog.records if "apt sources:" in r.getMessage()]
    assert said and said[0].endswith(
        "gpunode: host @fake/gpu-01: base: apt sources: the bookworm suite in the host's apt "
        "sources has components that are not plain names: '$(reboot)' (allowed: "
        "[a-z0-9][a-z0-9.+-]*)"
    ), said


def test_apt_mirror_is_refused_for_dnf_distros() -> None:
    with pytest.raises(ConfigError, match="apt_mirror: only apt distros"):
        node_config("rhel9", apt_mirror="http://mirror.example.net/rhel")


# --- what pyinfra shows ----------------------------------------------------------------------


@pytest.mark.parametrize("distro", ALL)
def test_operation_labels_carry_no_config_values(distro: str) -> None:
    mirror = "http://mirror.secret.example/ubuntu" if distro.startswith("ubuntu") else None
    if distro == "debian12":
        mirror = "http://mirror.secret.example/debian"
    run = run_base(node_config(distro, apt_mirror=mirror), distro)
    assert run.op_labels, "no operations recorded"
    values = [
        PROXY,
        KEY,
        KEY_BLOB,
        "alice@laptop",
        "ntp1.example.net",
        "gpuadmins",
        "alice",
        "mirror.secret.example",
    ]
    leaks = [(label, v) for label in run.op_labels for v in values if v in label]
    assert leaks == []


def test_gpunodes_own_sources_do_not_count_as_the_hosts(tmp_path: Path) -> None:
    """The NVIDIA role's non-free suite (written later in the same run) changes neither the
    components of the security source nor whether it is needed: a second run changes nothing."""
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list").write_text("deb http://deb.debian.org/debian bookworm main\n")
    (etc / "sources.list.d" / "gpunode-nvidia-distro.sources").write_text(
        "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-security\n"
        "Components: contrib non-free non-free-firmware\n"
    )
    run = run_base(node_config("debian12"), "debian12", handlers=[apt_sources_on(etc)])
    assert sources_list_entries(run.files[SECURITY_LIST]) == [
        (DEBIAN_KEYRING, "http://deb.debian.org/debian-security", "bookworm-security", "main")
    ]
