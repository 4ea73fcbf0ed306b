"""Tests that bite (issue 18) for gpunode/hardening.py: what ``make mutate`` showed no test read.

Mutants of gpunode/hardening.py that survived tests/unit/test_hardening.py and test_hostile.py
(docs/mutation.md, "Survivors") and the test here that kills each:

* the sshd drop-in's user-settable values (``MaxSessions``, ``ClientAliveCountMax``,
  ``KexAlgorithms``, ``MACs``, ...) are read back exactly, from the rendered text and through
  the real ``sshd -t`` and ``sshd -T`` of Debian's openssh-server (on PATH, or extracted once
  from the package as harness.find_promtool does for promtool; nothing is installed);
* an explicit ``hardening.ssh.permit_root_login`` wins over the default chosen from the
  connection user;
* ``install_sshd_command`` is RUN by a real ``sh``, not compared as text: the command string
  with its three absolute paths (drop-in, staged drop-in, sshd) moved under a temporary
  directory, a fake ``sshd`` (whose ``-t`` refuses a config holding a marker line) and a fake
  ``systemctl`` (which records its arguments) first on PATH. This machine's /etc/ssh and sshd
  are never touched: the test asserts no other absolute path is left in the command first;
* the user-visible refusals (a connection group that is a pattern, ``permit_root_login: no``
  while connecting as root) are compared whole: the advice in them is behaviour.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from harness import apt_extract, missing_libraries

from gpunode import hardening
from gpunode.config import load
from gpunode.schema import hardening as hardening_schema
from gpunode.schema.node import NodeConfig
from gpunode.schema.types import ConfigError

HOST = "gpu-01"
SOURCE = "test_hardening_bites"
NETWORK = {"admin_cidrs": ["127.0.0.0/8"], "monitoring_cidrs": ["10.40.0.0/24"]}

# Every user-settable sshd option away from its default, so a value that is not the
# configured one (a default, "None", a changed separator) shows.
SSH = {
    "max_auth_tries": 4,
    "login_grace_time": 20,
    "client_alive_interval": 120,
    "client_alive_count_max": 5,
    "max_sessions": 4,
    "max_startups": "5:50:20",
    "ciphers": ["aes256-gcm@openssh.com", "aes128-ctr"],
    "kex_algorithms": ["curve25519-sha256", "diffie-hellman-group16-sha512"],
    "macs": ["hmac-sha2-256-etm@openssh.com", "hmac-sha2-512"],
    "allow_tcp_forwarding": True,
    "allow_agent_forwarding": True,
    "compression": True,
    "tcp_keepalive": True,
}
EXPECTED = {
    "MaxAuthTries": "4",
    "LoginGraceTime": "20",
    "ClientAliveInterval": "120",
    "ClientAliveCountMax": "5",
    "MaxSessions": "4",
    "MaxStartups": "5:50:20",
    "Ciphers": "aes256-gcm@openssh.com,aes128-ctr",
    "KexAlgorithms": "curve25519-sha256,diffie-hellman-group16-sha512",
    "MACs": "hmac-sha2-256-etm@openssh.com,hmac-sha2-512",
    "AllowTcpForwarding": "yes",
    "AllowAgentForwarding": "yes",
    "Compression": "yes",
    "TCPKeepAlive": "yes",
}


def node(user: str = "root", **ssh: Any) -> NodeConfig:
    """One host's merged config through gpunode's real loader."""
    raw = {
        "defaults": {"distro": "debian12", "network": NETWORK, "hardening": {"ssh": ssh}},
        "hosts": {HOST: {"connection": {"address": "127.0.0.2", "user": user}}},
    }
    return load(raw, source=SOURCE).hosts[HOST].config


def dropin_options(text: str) -> dict[str, str]:
    """The drop-in's ``Keyword value`` lines, each keyword once."""
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    options = dict(line.split(" ", 1) for line in lines)
    assert len(options) == len(lines), text  # each option once: sshd takes the first
    return options


# --- the rendered drop-in ------------------------------------------------------------------


def test_every_user_settable_sshd_value_is_rendered_as_configured() -> None:
    options = dropin_options(hardening.render_sshd(node(**SSH), "root", "root"))
    assert {k: options[k] for k in EXPECTED} == EXPECTED


def test_the_default_sshd_values_are_the_schemas() -> None:
    options = dropin_options(hardening.render_sshd(node(), "root", "root"))
    assert options["MaxSessions"] == "10"
    assert options["ClientAliveCountMax"] == "3"
    assert options["MaxStartups"] == "10:30:60"
    assert options["Ciphers"] == ",".join(hardening_schema.SSH_CIPHERS)
    assert options["KexAlgorithms"] == ",".join(hardening_schema.SSH_KEX)
    assert options["MACs"] == ",".join(hardening_schema.SSH_MACS)
    for keyword in ("AllowTcpForwarding", "AllowAgentForwarding", "Compression", "TCPKeepAlive"):
        assert options[keyword] == "no", keyword


@pytest.mark.parametrize(
    "user, chosen, rendered",
    [
        # the default for a non-root connection user would be "no"
        ("alice", "prohibit-password", "prohibit-password"),
        ("alice", None, "no"),
        ("alice", "no", "no"),
        # the default for root is "prohibit-password"; "no" as root is refused at load
        ("root", None, "prohibit-password"),
        ("root", "prohibit-password", "prohibit-password"),
    ],
)
def test_an_explicit_permit_root_login_wins_over_the_default(
    user: str, chosen: str | None, rendered: str
) -> None:
    ssh = {} if chosen is None else {"permit_root_login": chosen}
    options = dropin_options(hardening.render_sshd(node(user, **ssh), user, user))
    assert options["PermitRootLogin"] == rendered


# --- the drop-in through the real sshd --------------------------------------------------

SSHD_CACHE = Path("/var/cache/gpunode/openssh-server")


def find_sshd() -> tuple[str, dict[str, str]]:
    """Debian's sshd and the environment to run it in: the installed one, or extracted once
    from the openssh-server package (with libwrap0, which bookworm's sshd links) into
    SSHD_CACHE. Nothing is installed and no sshd_config of this machine is read: the tests
    give sshd its config (-f) and a host key of their own (-h)."""
    installed = shutil.which("sshd") or "/usr/sbin/sshd"
    if Path(installed).exists():
        return installed, {}
    root = SSHD_CACHE / "root"
    binary = root / "usr/sbin/sshd"
    libdir = root / "usr/lib/x86_64-linux-gnu"
    try:
        if not binary.exists():
            SSHD_CACHE.mkdir(parents=True, exist_ok=True)
            apt_extract("openssh-server", root)
        if any(lib.startswith("libwrap") for lib in missing_libraries(binary, [libdir])):
            apt_extract("libwrap0", root)
        missing = missing_libraries(binary, [libdir])
        if missing:
            raise OSError(f"{binary} needs {', '.join(missing)}")
    except (OSError, subprocess.SubprocessError, StopIteration) as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"sshd could not be fetched from Debian's openssh-server package: {exc}")
        pytest.skip(f"sshd not available ({exc})")
    return str(binary), {"LD_LIBRARY_PATH": str(libdir)}


def run_sshd(tmp_path: Path, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``sshd -f <text> -h <a fresh host key> ARGS``. As root sshd would want its privsep
    user and /run/sshd; in a user namespace of its own (unshare -U) it runs unprivileged."""
    sshd, env = find_sshd()
    key = tmp_path / "host_ed25519"
    if not key.exists():
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
            check=True,
            timeout=30,
        )
    config = tmp_path / "sshd_config"
    config.write_text(text)
    config.chmod(0o600)
    command = [sshd, *args, "-f", str(config), "-h", str(key)]
    if os.geteuid() == 0:
        command = ["unshare", "-U", *command]
    return subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, **env}, timeout=30
    )


def test_real_sshd_accepts_the_drop_in_and_reads_every_value_as_configured(
    tmp_path: Path,
) -> None:
    cfg = node("alice", permit_root_login="prohibit-password", **SSH)
    text = hardening.render_sshd(cfg, "alice", "alice")
    checked = run_sshd(tmp_path, text, "-t")
    assert checked.returncode == 0, checked.stderr
    effective = run_sshd(tmp_path, text, "-T", "-C", "user=alice,host=ctl,addr=10.20.0.5")
    assert effective.returncode == 0, effective.stderr
    seen: dict[str, list[str]] = {}
    for line in effective.stdout.splitlines():
        key, _, value = line.partition(" ")
        seen.setdefault(key, []).append(value)
    wanted = hardening.sshd_options(cfg, "alice")
    # sshd -T prints prohibit-password by its old name
    wanted["permitrootlogin"] = "without-password"
    assert {k: seen.get(k) for k in wanted} == {k: [v] for k, v in wanted.items()}
    # and the values asked for, independently of sshd_options
    assert {k.lower(): seen.get(k.lower()) for k in EXPECTED} == {
        k.lower(): [v] for k, v in EXPECTED.items()
    }
    assert seen["allowgroups"] == ["gpunode_admins", "alice"]


def test_real_sshd_refuses_a_drop_in_with_a_bad_value(tmp_path: Path) -> None:
    """The check above can fail: sshd -t refuses what a wrong rendering would produce."""
    text = hardening.render_sshd(node(**SSH), "root", "root")
    for bad in (
        "MaxSessions None",
        "KexAlgorithms curve25519-sha256XX,XXdiffie-hellman-group16-sha512",
    ):
        key = bad.split()[0]
        broken = "\n".join(
            bad if line.startswith(f"{key} ") else line for line in text.splitlines()
        )
        assert broken != text
        checked = run_sshd(tmp_path, broken, "-t")
        assert checked.returncode != 0, bad
        assert key in checked.stderr, checked.stderr


# --- install_sshd_command, run by a real sh ---------------------------------------------

REFUSED = (
    "gpunode: sshd -t refused the hardened config: the previous one is back, sshd was not reloaded"
)
FAKE_SSHD = """#!/bin/sh
# sshd -t -f FILE refuses FILE when it holds the line RefuseAlone; sshd -t (the whole
# config: the drop-in in place) refuses when the drop-in holds RefuseWhole.
echo "sshd $*" >> {log}
if [ "$*" = "-t" ]; then file={dropin}; marker=RefuseWhole
elif [ "$1 $2" = "-t -f" ] && [ $# = 3 ]; then file=$3; marker=RefuseAlone
else echo "unexpected arguments: $*" >&2; exit 99
fi
if [ -e "$file" ] && grep -qx "$marker" "$file"; then
  echo "$file line 2: Bad configuration option: $marker" >&2
  exit 255
fi
"""
FAKE_SYSTEMCTL = """#!/bin/sh
echo "systemctl $*" >> {log}
"""


class Installed:
    """One run of install_sshd_command with its paths under ``root``."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.root = tmp_path / "root"
        self.dropin = Path(f"{self.root}{hardening.SSHD_DROPIN}")
        self.staged = Path(f"{self.root}{hardening.SSHD_STAGED}")
        self.previous = Path(f"{self.staged}.previous")
        self.sshd = Path(f"{self.root}{hardening.SSHD}")
        self.log = tmp_path / "calls.log"
        self.cwd = tmp_path / "cwd"
        self.bin = tmp_path / "bin"
        for directory in (self.dropin.parent, self.staged.parent, self.sshd.parent, self.cwd):
            directory.mkdir(parents=True, exist_ok=True)
        self.bin.mkdir()
        self.sshd.write_text(FAKE_SSHD.format(log=self.log, dropin=self.dropin))
        (self.bin / "systemctl").write_text(FAKE_SYSTEMCTL.format(log=self.log))
        for script in (self.sshd, self.bin / "systemctl"):
            script.chmod(0o755)

    def command(self, service: str) -> str:
        command = hardening.install_sshd_command(service)
        for path in (hardening.SSHD_STAGED, hardening.SSHD_DROPIN, hardening.SSHD):
            assert path in command
        for path in (hardening.SSHD_STAGED, hardening.SSHD_DROPIN, hardening.SSHD):
            command = command.replace(path, f"{self.root}{path}")
        # Nothing outside the temporary directory is named: this machine's sshd and
        # /etc/ssh stay out of reach.
        words = command.replace(";", " ").split()
        outside = [w for w in words if w.startswith("/") and not w.startswith(str(self.root))]
        assert outside == [], outside
        return command

    def run(self, service: str = "ssh") -> subprocess.CompletedProcess[str]:
        argv = ["sh", "-c", self.command(service)]
        if os.geteuid() != 0:  # install -o root -g root: root of a user namespace
            if not shutil.which("unshare"):
                pytest.skip("install -o root needs root or unshare -r")
            argv = ["unshare", "-r", *argv]
        env = {**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}"}
        return subprocess.run(
            argv, cwd=self.cwd, capture_output=True, text=True, env=env, timeout=30
        )

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


OLD = "# the previous drop-in\nMaxSessions 10\n"
NEW = "# the new drop-in\nMaxSessions 4\n"
WHOLE = "# the new drop-in\nRefuseWhole\n"
ALONE = "# the new drop-in\nRefuseAlone\n"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("service", ["ssh", "sshd"])
def test_install_sshd_puts_the_checked_drop_in_in_place_then_reloads(
    tmp_path: Path, service: str
) -> None:
    run = Installed(tmp_path)
    run.dropin.write_text(OLD)
    run.staged.write_text(NEW)
    done = run.run(service)
    assert (done.returncode, done.stderr) == (0, "")
    assert run.dropin.read_text() == NEW
    assert mode(run.dropin) == 0o600
    assert run.previous.read_text() == OLD  # kept next to the staged drop-in
    assert run.calls() == [
        f"sshd -t -f {run.staged}",
        "sshd -t",
        f"systemctl try-reload-or-restart {service}",
    ]
    assert list(run.cwd.iterdir()) == []  # nothing written where the command runs


def test_install_sshd_refused_as_a_whole_restores_the_previous_drop_in(tmp_path: Path) -> None:
    run = Installed(tmp_path)
    run.dropin.write_text(OLD)
    run.dropin.chmod(0o644)
    run.staged.write_text(WHOLE)  # passes alone, not as part of the whole config
    done = run.run()
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [
        f"{run.dropin} line 2: Bad configuration option: RefuseWhole",
        REFUSED,
    ]
    assert run.dropin.read_text() == OLD
    assert mode(run.dropin) == 0o600
    assert run.calls() == [f"sshd -t -f {run.staged}", "sshd -t"]  # no reload
    assert list(run.cwd.iterdir()) == []


def test_install_sshd_refused_as_a_whole_without_a_previous_drop_in_leaves_none(
    tmp_path: Path,
) -> None:
    """A ``.previous`` left by an earlier run is not what was in place: it must not come back."""
    run = Installed(tmp_path)
    run.previous.write_text("# stale, from an earlier run\n")
    run.staged.write_text(WHOLE)
    done = run.run()
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [
        f"{run.dropin} line 2: Bad configuration option: RefuseWhole",
        REFUSED,
    ]
    assert not run.dropin.exists()
    assert not run.previous.exists()
    assert run.calls() == [f"sshd -t -f {run.staged}", "sshd -t"]
    assert list(run.cwd.iterdir()) == []


def test_install_sshd_with_a_staged_drop_in_sshd_refuses_changes_nothing(tmp_path: Path) -> None:
    run = Installed(tmp_path)
    run.dropin.write_text(OLD)
    run.staged.write_text(ALONE)
    done = run.run()
    assert done.returncode == 255
    assert done.stderr.splitlines() == [
        f"{run.staged} line 2: Bad configuration option: RefuseAlone"
    ]
    assert run.dropin.read_text() == OLD
    assert not run.previous.exists()
    assert run.calls() == [f"sshd -t -f {run.staged}"]


# --- refusals, word for word --------------------------------------------------------------


@pytest.mark.parametrize("group", ["*", "a,b", "!root"])
def test_a_pattern_as_the_connection_group_is_refused_with_the_allowed_characters(
    group: str,
) -> None:
    with pytest.raises(ValueError) as exc:
        hardening.render_sshd(node(), "root", group)
    assert str(exc.value) == (
        f"the connection user's primary group {group!r} is not a plain group name "
        "(allowed: letters, digits, '_' and '-')"
    )


def test_permit_root_login_no_as_root_is_refused_with_the_way_out() -> None:
    with pytest.raises(ConfigError) as exc:
        node("root", permit_root_login="no")
    assert str(exc.value) == (
        f"{SOURCE}: host {HOST}: hardening.ssh.permit_root_login: 'no' but gpunode connects "
        "as root (connection.user), so the run would lock itself out (allowed: "
        "prohibit-password, or connect as an admin user with sudo)"
    )


def test_the_sudo_log_file_the_schema_was_bypassed_for_is_refused_naming_the_key() -> None:
    """The sudoers renderer refuses a control character on its own (the schema refuses it at
    load): a value reaching it some other way is named by its key, never written."""
    cfg = node()
    sudo = cfg.hardening.sudo.model_copy(update={"logfile": "/var/log/sudo.log\nDefaults !log"})
    cfg = cfg.model_copy(update={"hardening": cfg.hardening.model_copy(update={"sudo": sudo})})
    with pytest.raises(ConfigError) as err:
        hardening.render_sudo_defaults(cfg)
    assert str(err.value).startswith("hardening.sudo.logfile: ")
