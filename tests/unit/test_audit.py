"""The audit trail (hardening.audit): auditd's rules and settings as gpunode renders them, and
the rules at work in this machine's own kernel.

The lab's hosts are containers, whose kernel's audit belongs to the machine underneath
(auditd cannot start there: the role says so on every run). This machine boots its own
kernel, so the kernel side is tested here, for real, as root: the rules gpunode renders are
loaded with Debian's ``auditctl`` (auditd 3.0.9, extracted once from Debian's packages into
/var/cache/gpunode/auditd, nothing installed), a real ``auditd`` runs in the foreground with a
configuration of the test's own (its log in a temporary directory), and the events are read
back with ``ausearch``. Every rule is removed and auditing switched off again afterwards.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import apt_extract, missing_libraries, need_root

from gpunode import hardening
from gpunode.config import load
from gpunode.schema import hardening as schema
from gpunode.schema.node import NodeConfig

AUDIT_CACHE = Path("/var/cache/gpunode/auditd")


def node(**hardening_data: Any) -> NodeConfig:
    raw = {
        "defaults": {
            "distro": "debian12",
            "firewall": {"enabled": False},
            "hardening": hardening_data,
            "vault": {"addr": "https://vault.example.net:8200"},
            "secrets": {
                "hf-token": {"path": "kv/data/hf", "key": "token", "dest": "/srv/app/hf.env"},
            },
        },
        "hosts": {"gpu-01": {"connection": {"address": "192.0.2.10"}}},
    }
    return load(raw, source="test_audit").hosts["gpu-01"].config


def test_a_secret_at_its_default_place_is_watched_there() -> None:
    cfg = node()
    secrets = {**cfg.secrets, "llm": cfg.secrets["hf-token"].model_copy(update={"dest": None})}
    watches = dict(hardening.audit_watches(cfg.model_copy(update={"secrets": secrets})))
    assert watches["/etc/gpunode/secrets/llm.env"] == "gpunode-secrets"
    assert watches["/srv/app/hf.env"] == "gpunode-secrets"


def test_a_deeper_path_comes_before_the_folder_it_is_in() -> None:
    """The first matching watch gives an event its key: a secret file inside a folder gpunode
    watches under another key (added last) is ordered before that folder."""
    cfg = node()
    inner = cfg.secrets["hf-token"].model_copy(update={"dest": "/etc/gpunode/app/hf.env"})
    paths = [
        p
        for p, _ in hardening.audit_watches(cfg.model_copy(update={"secrets": {"hf-token": inner}}))
    ]
    assert paths.index("/etc/gpunode/app/hf.env") < paths.index("/etc/gpunode")
    depths = [p.count("/") for p in paths]
    assert depths == sorted(depths, reverse=True)


@pytest.mark.parametrize("dest", ["/srv/app/../etc/shadow", "/srv/app/with space.env", "/srv/a\nb"])
def test_a_path_the_schema_was_bypassed_for_is_never_watched(dest: str) -> None:
    """The rules file is line-based: a path with a space, a newline or `..` (refused at load)
    reaching the renderer some other way stops it, naming the path."""
    cfg = node()
    bad = cfg.secrets["hf-token"].model_copy(update={"dest": dest})
    cfg = cfg.model_copy(update={"secrets": {"hf-token": bad}})
    with pytest.raises(ValueError) as err:
        hardening.render_audit_rules(cfg)
    assert str(err.value) == f"{bad.dest!r} is not a plain absolute path"


def rule_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_rules_watch_gpunodes_files_identity_sudo_sshd_modules_and_time() -> None:
    lines = rule_lines(hardening.render_audit_rules(node()))
    watches = [line for line in lines if line.startswith("-w ")]
    assert "-w /etc/gpunode/secrets -p wa -k gpunode-secrets" in watches
    assert "-w /srv/app/hf.env -p wa -k gpunode-secrets" in watches  # a secret elsewhere
    for path, key in schema.AUDIT_WATCHES.items():
        assert f"-w {path} -p wa -k {key}" in watches, path
    # the secrets' own key wins over gpunode's: the deeper path comes first
    assert watches.index("-w /etc/gpunode/secrets -p wa -k gpunode-secrets") < watches.index(
        "-w /etc/gpunode -p wa -k gpunode"
    )
    for arch in ("b64", "b32"):
        assert (
            f"-a always,exit -F arch={arch} -S init_module,finit_module,delete_module -k modules"
        ) in lines
        assert (
            f"-a always,exit -F arch={arch} -S adjtimex,settimeofday,clock_settime -k time-change"
        ) in lines
        assert (
            f"-a always,exit -F arch={arch} -S execve -F euid=0 -F auid>=1000 -F auid!=unset "
            "-k root-commands"
        ) in lines
    assert not any(line.startswith("-e") or line == "-D" for line in lines)


@pytest.mark.parametrize(("family", "group"), [("apt", "adm"), ("dnf", "root")])
def test_auditd_keeps_its_logs_bounded(family: str, group: str) -> None:
    text = hardening.render_auditd_conf(node(audit={"max_log_file_mb": 20, "num_logs": 4}), family)
    settings = dict(
        (k.strip(), v.strip()) for k, _, v in (line.partition("=") for line in rule_lines(text))
    )
    assert settings["max_log_file"] == "20" and settings["num_logs"] == "4"
    assert settings["max_log_file_action"] == "ROTATE"
    assert settings["log_group"] == group
    # a full disk suspends logging instead of halting an inference node
    assert settings["disk_full_action"] == settings["admin_space_left_action"] == "SUSPEND"
    assert len(settings) == len(rule_lines(text))  # every line is key = value


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"audit": {"num_logs": 1}}, "hardening.audit.num_logs"),
        ({"audit": {"max_log_file_mb": 0}}, "hardening.audit.max_log_file_mb"),
        ({"audit": {"immutable": "sometimes"}}, "hardening.audit.immutable"),
    ],
)
def test_bad_audit_settings_are_refused_at_load(data: dict[str, Any], says: str) -> None:
    from gpunode.schema.types import ConfigError

    with pytest.raises(ConfigError, match=re.escape(says)):
        node(**data)


# --- the kernel side, on this machine --------------------------------------------------------


def audit_tools() -> tuple[Path, dict[str, str]]:
    root = AUDIT_CACHE / "root"
    libdirs = [root / "lib/x86_64-linux-gnu", root / "usr/lib/x86_64-linux-gnu"]
    try:
        if not (root / "sbin/auditd").exists():
            for package in ("auditd", "libauparse0", "libwrap0"):
                apt_extract(package, root)
        missing = missing_libraries(root / "sbin/auditd", libdirs)
        if missing:
            raise OSError(f"auditd needs {', '.join(missing)}")
    except (OSError, subprocess.SubprocessError, StopIteration) as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"auditd could not be fetched from Debian's packages: {exc}")
        pytest.skip(f"auditd not available ({exc})")
    return root / "sbin", {"LD_LIBRARY_PATH": ":".join(str(d) for d in libdirs)}


@pytest.fixture
def kernel_audit(tmp_path: Path) -> Iterator[tuple[Any, Path]]:
    """A real auditd in the foreground, its log under tmp_path; yields a runner for the audit
    tools and the log. Leaves the kernel with no rules and auditing off."""
    need_root("loading audit rules into the kernel")
    sbin, env = audit_tools()
    env = {**os.environ, **env}

    def tool(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(sbin / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=check,
        )

    status = tool("auditctl", "-s", check=False)
    if status.returncode != 0 or re.search(r"^pid [1-9]", status.stdout, re.M):
        pytest.fail(f"this machine's kernel audit is not free for the test: {status.stdout}")
    conf_dir = tmp_path / "conf"
    (conf_dir / "plugins").mkdir(parents=True)
    log = tmp_path / "audit.log"
    text = hardening.render_auditd_conf(node(), "apt")
    text = re.sub(r"(?m)^log_file = .*$", f"log_file = {log}", text)
    text = re.sub(r"(?m)^log_group = .*$", "log_group = root", text)
    text = re.sub(r"(?m)^plugin_dir = .*$", f"plugin_dir = {conf_dir / 'plugins'}", text)
    (conf_dir / "auditd.conf").write_text(text)
    (conf_dir / "auditd.conf").chmod(0o640)
    daemon = subprocess.Popen(
        [str(sbin / "auditd"), "-n", "-c", str(conf_dir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # auditd opens its log before it switches auditing on and registers with the kernel:
        # ready is `enabled 1` and its own pid in the kernel's status, not the log's existence
        deadline = time.monotonic() + 30
        while True:
            status = tool("auditctl", "-s", check=False).stdout
            if re.search(r"^enabled 1$", status, re.M) and re.search(
                rf"^pid {daemon.pid}$", status, re.M
            ):
                break
            if daemon.poll() is not None or time.monotonic() > deadline:
                daemon.terminate()
                pytest.fail(
                    f"auditd did not register with the kernel within 30 s: {status}"
                    f"{daemon.communicate(timeout=30)[0]}"
                )
            time.sleep(0.1)
        assert log.exists(), "auditd registered without opening its log"
        yield tool, log
    finally:
        tool("auditctl", "-D", check=False)
        daemon.terminate()
        daemon.wait(timeout=30)
        tool("auditctl", "-e", "0", check=False)


def moved_rules(tmp_path: Path) -> Path:
    """The rules as rendered, every watched path moved under tmp_path (this machine has no
    /etc/gpunode), their parents made as the role's load command makes them."""
    text = hardening.render_audit_rules(node())
    text = re.sub(r"(?m)^-w (/\S+)", lambda m: f"-w {tmp_path}{m[1]}", text)
    for path in re.findall(r"(?m)^-w (\S+)", text):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    rules = tmp_path / "60-gpunode.rules"
    rules.write_text(text)
    return rules


def test_every_rendered_rule_loads_into_the_kernel(kernel_audit, tmp_path: Path) -> None:
    tool, _ = kernel_audit
    rules = moved_rules(tmp_path)
    loaded = tool("auditctl", "-R", str(rules), check=False)
    assert loaded.returncode == 0, loaded.stderr
    listed = tool("auditctl", "-l").stdout.splitlines()
    keys = {m[1] for line in listed if (m := re.search(r"(?:-F key=|-k )(\S+)$", line))}
    assert keys == {*schema.AUDIT_WATCHES.values(), *schema.AUDIT_SYSCALLS, "root-commands"}
    assert len(listed) == len(rule_lines(rules.read_text()))


def test_a_write_to_the_secrets_and_a_command_as_root_are_recorded(
    kernel_audit, tmp_path: Path
) -> None:
    """A secret written, and a program run as root by a user who logged in (login uid 1000,
    as sshd and PAM set it; what sudo runs), read back with ausearch by their keys."""
    tool, log = kernel_audit
    tool("auditctl", "-R", str(moved_rules(tmp_path)))
    secrets = tmp_path / "etc" / "gpunode" / "secrets"
    secrets.mkdir(parents=True, exist_ok=True)
    # Written by a process started now, as on a node (where every writer starts after auditd):
    # the kernel audits only tasks forked once auditing had ever been on, so a write from this
    # pytest process, started before the first test switched auditing on after a fresh boot, is
    # never recorded (what CI on a freshly booted machine found)
    subprocess.run(
        ["sh", "-c", 'printf "TOKEN=x\\n" > "$1"', "sh", str(secrets / "demo.env")],
        check=True,
        timeout=30,
    )
    marker = tmp_path / "ran-as-root"
    subprocess.run(
        ["sh", "-c", f"echo 1000 > /proc/self/loginuid && exec /usr/bin/touch {marker}"],
        check=True,
        timeout=30,
    )

    def search(key: str) -> str:
        return tool("ausearch", "-if", str(log), "-k", key, check=False).stdout

    # auditd writes its log asynchronously: wait up to 30 s for both events
    deadline = time.monotonic() + 30
    while True:
        secret_events, root_events = search("gpunode-secrets"), search("root-commands")
        if ("demo.env" in secret_events and str(marker) in root_events) or (
            time.monotonic() > deadline
        ):
            break
        time.sleep(0.5)
    assert "demo.env" in secret_events, secret_events
    assert str(marker) in root_events and " auid=1000 " in root_events, root_events


# --- auditing from boot: the kernel's command line, in a VM --------------------------------------

BOOT_CHECK = r"""#!/bin/sh
PATH=/sbin:/bin
export PATH
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmp /tmp
exec 3>/dev/ttyS1
echo 1000 > /proc/sys/kernel/printk_ratelimit_burst  # no auditd: records go to the kernel log
echo "cmdline $(cat /proc/cmdline)" >&3
auditctl -s | grep -E '^(enabled|backlog_limit) ' >&3
mkdir /tmp/s
auditctl -e 1 >/dev/null
auditctl -w /tmp/s -p wa -k probe >/dev/null
echo x > /tmp/s/by-pid1
sh -c 'echo x > /tmp/s/by-child'
sleep 1
dmesg | grep -o 'name="/tmp/s/by-[a-z0-9]*"' | sed 's/^/event /' >&3
echo done >&3
poweroff -f
"""


def boot_with(args: tuple[str, ...], work: Path) -> str:
    """Debian 12's kernel under QEMU with ``args`` on its command line and a busybox PID 1
    that switches auditing on, watches a folder and writes there itself and from a child:
    what PID 1 reported (its command line, the audit status it found, the events)."""
    import vmkernel

    sbin, env = audit_tools()
    try:
        vmkernel.qemu()
        tools = vmkernel.tools()
        kernel = vmkernel.kernel([], tools)
        found = subprocess.run(
            ["ldd", str(sbin / "auditctl")], env={**os.environ, **env}, capture_output=True,
            text=True, check=True,
        ).stdout  # fmt: skip
    except (vmkernel.Unavailable, subprocess.SubprocessError) as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the VM cannot run, and CI=true: {exc}")
        pytest.skip(f"the VM cannot run ({exc})")
    copies = {"/sbin/auditctl": sbin / "auditctl"}
    for library in re.findall(r"(?m)(/\S+) \(0x", found):
        name = Path(library).name
        copies[library if "ld-linux" in name else f"/lib/x86_64-linux-gnu/{name}"] = Path(library)
    work.mkdir(parents=True, exist_ok=True)
    initramfs = vmkernel.build_initramfs(
        kernel, tools, [], {"/check": (BOOT_CHECK, 0o755)}, work, copies
    )
    boot = vmkernel.boot(kernel, initramfs, "/check", 300, work, args)
    if boot.returncode is None or not re.search(r"(?m)^done$", boot.results):
        pytest.fail(f"the VM did not finish (QEMU exit {boot.returncode}):\n{boot.tail()}")
    return boot.results


def test_the_boot_args_audit_what_starts_before_auditd(tmp_path: Path) -> None:
    """Without AUDIT_BOOT_ARGS, a process that was running before auditing was first switched
    on (PID 1 here, as systemd on a node) is never audited: its write to a watched folder
    leaves no record, a child forked afterwards does. With them, PID 1's write is recorded,
    auditing is on from boot and the backlog has room for 8192 records. So the words gpunode
    puts on the kernel's command line are the ones this kernel reads."""
    need_root("booting a VM from /var/cache/gpunode/vmkernel")
    assert schema.AUDIT_BOOT_ARGS == ("audit=1", "audit_backlog_limit=8192")
    plain = boot_with((), tmp_path / "plain")
    assert "enabled 0" in plain.splitlines(), plain
    assert re.findall(r"(?m)^event (.*)$", plain) == ['name="/tmp/s/by-child"'], plain
    booted = boot_with(schema.AUDIT_BOOT_ARGS, tmp_path / "audit")
    cmdline = re.search(r"(?m)^cmdline (.*)$", booted)
    assert cmdline and cmdline[1].split()[-2:] == list(schema.AUDIT_BOOT_ARGS)
    assert {"enabled 1", "backlog_limit 8192"} <= set(booted.splitlines()), booted
    assert re.findall(r"(?m)^event (.*)$", booted) == [
        'name="/tmp/s/by-pid1"',
        'name="/tmp/s/by-child"',
    ], booted
