"""Issue 18, tests that bite: four bugs that once survived every unit test, each caught here.

* ``gpunode drift --apply`` on a host whose correction does not take (something on the
  host undoes it): the check after the correction still finds drift, so the run exits 2
  and never says "drift corrected". The host is this machine (``@local``), for real.
* The secrets role on a fake host, reading a canary secret from a real OpenBao
  (harness.start_bao), at ``-vvv`` with ``--diff``: no operation name or argument, no
  command and nothing printed or logged holds the value, any 8 characters of it, or its
  hex, base64, md5, sha1, sha256 or sha512 (nor those of its env-file line). The lab's
  leak test looks for the whole value only.
* ``private_file`` and ``secret_file`` under ``--diff`` (pyinfra's ``Config.DIFF``) over an
  existing file with other content, on this machine: the file is rewritten, and no diff,
  no "Will modify" and no line of either content is printed.
* The NVIDIA driver role alone (no CUDA role after it, which holds the same patterns and
  hid a driver role that held nothing): it holds every driver package pattern after
  installing, before its reboot, and holds installed packages that are not held yet.
  The hold command runs for real under ``sh`` on a package listing.
"""

from __future__ import annotations

import grp
import hashlib
import io
import json
import logging
import os
import pwd
import re
import shlex
import subprocess
import sys
import tempfile
from base64 import b64encode, urlsafe_b64encode
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import harness
import pytest
from harness import Bao, Run, booting, fake_clock, run_deploys, start_bao, stop_bao
from pyinfra.api import Config, Inventory, State, output
from pyinfra.api.connect import connect_all
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.operation import add_op
from pyinfra.api.operations import run_ops
from pyinfra.facts.server import Os

import gpunode.operations.server as server_ops
from gpunode.clients import vault as vault_module
from gpunode.clients.vault import SecretValue
from gpunode.commands.drift import EXIT_DRIFT, check
from gpunode.config import load
from gpunode.facts.files import PrivateFileState
from gpunode.facts.nvidia import NvidiaHost
from gpunode.paths import REPO_ROOT
from gpunode.schema.node import NodeConfig
from roles.nvidia_driver import nvidia_driver
from roles.secrets import secrets

# --- drift --apply: a correction that does not take -------------------------------------

# "Marker file" sets the mode; something on the host (here the handler that follows it)
# sets it back, so the correction never holds. The handler runs only `_if` the marker
# changed: it is not drift of its own, and it runs only while the correction executes.
UNDONE_DEPLOY = """
from pyinfra import host
from pyinfra.operations import files, server

marker = files.file(name="Marker file", path=host.data.marker, mode="640")
server.shell(
    name="Something on the host undoes it",
    commands=[f"chmod 666 {host.data.marker}"],
    _if=marker.did_change,
)
files.directory(name="Marker directory", path=host.data.marker_dir, mode="755")
"""


def drift_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpunode.commands.cli", "drift", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


def undone_host(tmp_path: Path) -> tuple[str, str, Path]:
    marker, marker_dir = tmp_path / "state" / "marker", tmp_path / "state" / "dir"
    marker.parent.mkdir()
    marker.write_text("")
    marker.chmod(0o666)
    inventory = tmp_path / "inv.py"
    inventory.write_text(
        f'nodes = [("@local", {{"marker": "{marker}", "marker_dir": "{marker_dir}"}})]\n'
    )
    deploy = tmp_path / "undone.py"
    deploy.write_text(UNDONE_DEPLOY)
    return str(inventory), str(deploy), marker


def test_apply_whose_correction_does_not_take_is_drift_not_corrected(tmp_path: Path) -> None:
    inventory, deploy, marker = undone_host(tmp_path)
    out_json, out_prom = tmp_path / "drift.json", tmp_path / "drift.prom"
    proc = drift_cli(inventory, deploy, "--apply", "--json", str(out_json), "--prometheus",
                     str(out_prom))  # fmt: skip
    # the correction did run (the directory is there now) and was undone
    assert (tmp_path / "state" / "dir").is_dir()
    assert oct(marker.stat().st_mode & 0o777) == "0o666"
    assert proc.returncode == EXIT_DRIFT, proc.stdout + proc.stderr
    assert "drift corrected" not in proc.stdout
    assert proc.stdout.splitlines() == [
        "@local: drift: 1 operation(s) would change",
        "  - Marker file",
        "drift: 1 host(s): 1 drift",
    ]
    host = json.loads(out_json.read_text())["hosts"]["@local"]
    assert host["drifted"] == ["Marker file", "Marker directory"]
    assert host["corrected"] == ["Marker file", "Marker directory"]
    assert (host["remaining"], host["status"]) == (["Marker file"], "drift")
    assert 'gpunode_drift_remaining_operations{host="@local"} 1' in out_prom.read_text()


def test_apply_whose_correction_does_not_take_through_the_api(tmp_path: Path) -> None:
    inventory, deploy, _ = undone_host(tmp_path)
    report = check(inventory, deploy, apply=True)
    host = report.hosts["@local"]
    assert host.applied and host.corrected == ["Marker file", "Marker directory"]
    assert host.remaining == ["Marker file"]
    assert host.status == "drift" and report.exit_code == EXIT_DRIFT
    assert report.lines() == [
        "@local: drift: 1 operation(s) would change",
        "  - Marker file",
        "drift: 1 host(s): 1 drift",
    ]


# --- the secrets role: no part of a value anywhere but in the file ----------------------

CANARY = "Vq3xK9tLmZ7pR2wY8nB4hJ6c"  # no 6 characters of it occur in pyinfra's output
ENV = "API_KEY"
READ_POLICY = """
path "secret/data/gpunode/*" { capabilities = ["read"] }
path "secret/metadata/gpunode/*" { capabilities = ["read"] }
"""


def derived_forms(value: str, env: str) -> list[str]:
    """What a leak of ``value`` could look like: every 6 characters of it (a prefix, a
    middle, a tail), and the hex, base64 and md5/sha1/sha256/sha512 of the value, of its
    first 8 and 9 characters, and of its env-file line."""
    forms = {value[i : i + 6] for i in range(len(value) - 5)}
    for text in (value, value + "\n", value[:8], value[:9], f"{env}={value}\n", f"{env}={value}"):
        data = text.encode()
        forms |= {data.hex(), data.hex().upper()}
        forms |= {b64encode(data).decode().rstrip("="), urlsafe_b64encode(data).decode()[:12]}
        forms |= {hashlib.new(a, data).hexdigest() for a in ("md5", "sha1", "sha256", "sha512")}
    return sorted(forms)


def leaked(text: str, forms: list[str]) -> list[str]:
    return [form for form in forms if form in text]


def test_derived_forms_find_a_prefix_a_digest_and_base64() -> None:
    """The leak check itself can fail: each kind of leak it claims to catch is caught."""
    forms = derived_forms(CANARY, ENV)
    for text in (
        f"Secret file {CANARY[:8]}",
        f"tail {CANARY[-8:]}.",
        f"Secret file group {CANARY[:6]}",
        f"middle {CANARY[9:16]}",
        hashlib.sha256(f"{ENV}={CANARY}\n".encode()).hexdigest(),
        hashlib.md5(CANARY.encode()).hexdigest(),  # noqa: S324
        b64encode(CANARY.encode()).decode(),
        CANARY.encode().hex(),
    ):
        assert leaked(text, forms), text
    assert leaked("Secret file SecretValue('k', version=1, value=*MASKED*)", forms) == []


class LoudState(State):
    """A pyinfra state as ``pyinfra -vvv --diff`` makes it (harness.run_deploys builds the
    state; this one replaces pyinfra's there)."""

    def __init__(self, inventory: Inventory, config: Config) -> None:
        config.DIFF = True
        super().__init__(inventory, config)
        for flag in ("print_fact_info", "print_noop_info", "print_input", "print_fact_input"):
            setattr(self, flag, True)
        self.print_output = self.print_fact_output = True


@pytest.fixture
def bao(tmp_path: Path) -> Iterator[Bao]:
    server = start_bao(tmp_path)
    c = server.client()
    c.sys.enable_auth_method("approle", path="approle")
    c.sys.create_or_update_policy("gpunode-read", READ_POLICY)
    c.auth.approle.create_or_update_approle("gpunode", token_policies=["gpunode-read"])
    server.role_id = c.auth.approle.read_role_id("gpunode")["data"]["role_id"]
    c.secrets.kv.v2.create_or_update_secret("gpunode/leak", {"api_key": CANARY})
    try:
        yield server
    finally:
        stop_bao(server)


def secrets_config(bao: Bao) -> NodeConfig:
    raw = {
        "defaults": {
            "distro": "debian12",
            "firewall": {"enabled": False},  # on by default: the firewall role's concern
            "vault": {"addr": bao.addr, "role_id": bao.role_id, "retries": 0},
            "secrets": {
                "chat-key": {
                    "path": "gpunode/leak",
                    "key": "api_key",
                    "env": ENV,
                    "group": "gpunode-chat",
                    "restart": ["gpunode-chat.service"],
                }
            },
        },
        "hosts": {"gpu-01": {"connection": {"address": "192.0.2.10"}}},
    }
    return load(raw, source="inv.yml").hosts["gpu-01"].config


def test_the_secrets_role_puts_no_part_of_a_value_in_names_args_commands_or_output(
    bao: Bao,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(output, "_echo", click.echo)  # what the CLI installs: echo prints
    monkeypatch.setattr(harness, "State", LoudState)
    monkeypatch.setenv("VAULT_SECRET_ID", bao.secret_id())
    dest = "/etc/gpunode/secrets/chat-key.env"
    # the file exists with other content: the role reads it back, compares, rewrites it
    responses: dict[Any, Any] = {
        Os().command(): "Linux",
        PrivateFileState().command(dest): "file root gpunode-chat 640",
    }
    states: list[State] = []
    try:
        run = run_deploys(config := secrets_config(bao), responses, [secrets], state_out=states)
    finally:
        vault_module.close_all()
    assert not run.failed
    assert config.secrets["chat-key"].env_name() == ENV
    # the value did go through this run: into the file, and nowhere else
    assert [c for p, c in run.uploads if CANARY in c] == [f"{ENV}={CANARY}\n"]
    [state] = states
    metas = list(state.op_meta.values())
    names = [n for m in metas for n in m.names]
    out, err = capfd.readouterr()
    printed = "\n".join([out, err, caplog.text])
    assert "private file /etc/gpunode/secrets/chat-key.env: content differs" in printed
    assert "[@fake/gpu-01] >>> " in printed  # -vvv was really on (commands shown)
    forms = derived_forms(CANARY, ENV)
    surfaces = {
        # pyinfra shows an operation's arguments where it has no name (none here, so far)
        "operation names and arguments": "\n".join([*names, *(a for m in metas for a in m.args)]),
        "global arguments": "\n".join(repr(m.global_arguments) for m in metas),
        "op labels": "\n".join(run.op_labels),
        "commands": "\n".join(run.commands),
        "command output": "\n".join(repr(out) for _, _, out in run.results),
        "printed or logged": printed,
    }
    for where, text in surfaces.items():
        assert text, f"{where}: nothing recorded (the check would be vacuous)"
        assert leaked(text, forms) == [], f"the value (or part of it) in the {where}"
    # the operations checked are the role's own, each name exactly (a shorter fragment of the
    # value than the windows above would still change a name)
    assert sorted(set(names)) == [
        "gpunode secrets | Restart a service whose secret changed",
        "gpunode secrets | Secret file",
        "gpunode secrets | Secret file group",
        "gpunode secrets | Secrets directory",
    ]


# --- private_file and secret_file under --diff -----------------------------------------

OLD = "API_KEY=old-Hs4nW8qXe2Lr\n"


def diff_run(op: Any, **kwargs: Any) -> State:
    """``op`` on this machine, with pyinfra's ``--diff`` and ``-vvv`` (LoudState)."""
    inventory = Inventory((["@local"], {}))
    state = LoudState(inventory, Config())
    connect_all(state)
    add_op(state, op, **kwargs)
    try:
        run_ops(state)
    except PyinfraError:  # "No hosts remaining": the only host failed
        pass
    assert not state.failed_hosts
    return state


PRIVATE_OPS = ["secret_file", "private_file"]


@pytest.mark.parametrize("exists", [True, False], ids=["replaced", "created"])
@pytest.mark.parametrize("which", PRIVATE_OPS)
def test_a_private_file_is_never_diffed_under_diff(
    which: str,
    exists: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from gpunode.operations.files import MaskedBytes, private_file, secret_file

    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(output, "_echo", click.echo)
    target = tmp_path / "demo.env"
    if exists:  # else the op creates it: pyinfra's own ops print "Will create" and the lines
        target.write_text(OLD)
        target.chmod(0o600)
    user, group = pwd.getpwuid(os.geteuid()).pw_name, grp.getgrgid(os.getegid()).gr_name
    common = dict(name="Secret file", path=str(target), user=user, group=group, mode="0600")
    if which == "secret_file":
        diff_run(secret_file, secret=SecretValue("demo", 3, CANARY), env=ENV, **common)
    else:
        content = MaskedBytes("demo", f"{ENV}={CANARY}\n".encode())
        diff_run(private_file, content=content, **common)
    assert target.read_text() == f"{ENV}={CANARY}\n"  # the change happened, under --diff
    out, err = capfd.readouterr()
    printed = "\n".join([out, err, caplog.text])
    if exists:
        assert f"private file {target}: content differs" in printed  # -vvv was on
    for marker in ("Will modify", "Will create", "@@ ", "+ API_KEY", "- API_KEY"):
        assert marker not in printed, f"a diff was printed ({marker!r})"
    assert "old-Hs4nW8qXe2Lr" not in printed  # the old content
    assert leaked(printed, derived_forms(CANARY, ENV)) == []


def test_diff_is_really_on_for_a_plain_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The control: the same state makes pyinfra's own files.put print its diff, so the
    private files' silence above is theirs, not a --diff that was off."""
    from pyinfra.operations import files

    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(output, "_echo", click.echo)
    target = tmp_path / "plain.env"
    target.write_text(OLD)
    diff_run(files.put, name="Plain file", src=io.StringIO("API_KEY=new\n"), dest=str(target))
    out, err = capfd.readouterr()
    printed = "\n".join([out, err, caplog.text])
    assert "Will modify" in printed and "old-Hs4nW8qXe2Lr" in printed
    caplog.clear()
    created = tmp_path / "created.env"
    diff_run(files.put, name="Plain file", src=io.StringIO("API_KEY=new\n"), dest=str(created))
    out, err = capfd.readouterr()
    printed = "\n".join([out, err, caplog.text])
    assert "Will create" in printed and "API_KEY=new" in printed


# --- the NVIDIA driver role alone holds the driver's packages ---------------------------

KERNEL = {"ubuntu2404": "6.8.0-45-generic", "debian12": "6.1.0-28-amd64",
          "rhel9": "5.14.0-427.13.1.el9_4.x86_64"}  # fmt: skip
VM_LSPCI = Path(__file__).parent / "fixtures" / "nvidia" / "lspci-Dnn-h100-vm.txt"
# Written out by hand (not read from gpunode/nvidia.py): a pattern dropped there fails here.
HOLD_PATTERNS = {
    "apt": ("*nvidia*", "libcuda*", "libnvcuvid*", "libnvoptix*", "cuda-*", "libcudnn*",
            "datacenter-gpu-manager*"),
    "dnf": ("*nvidia*", "cuda-*", "libcudnn*", "datacenter-gpu-manager*"),
}  # fmt: skip
# One installed package per pattern, and packages no pattern matches.
MATCHING = {
    "apt": ["nvidia-open-580", "libcuda1", "libnvcuvid1", "libnvoptix1", "cuda-drivers-580",
            "libcudnn9-cuda-12", "datacenter-gpu-manager-4-core"],
    "dnf": ["kmod-nvidia-open-dkms", "cuda-drivers", "libcudnn9", "datacenter-gpu-manager-4-core"],
}  # fmt: skip
OTHERS = ["bash", "libc6", "dkms", "openssh-server"]


def gpu_state(distro: str) -> list[str]:
    """What the real NvidiaHost command prints on a VM with 4 H100 (no driver loaded)."""
    command = NvidiaHost().command()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        devices, bindir = t / "devices", t / "bin"
        devices.mkdir()
        bindir.mkdir()
        for line in VM_LSPCI.read_text().splitlines():
            m = re.match(r"^(\S+) .*\[([0-9a-f]{4})\]: .*\[([0-9a-f]{4}):([0-9a-f]{4})\]", line)
            assert m, line
            device = devices / m[1]
            device.mkdir()
            (device / "vendor").write_text(f"0x{m[3]}\n")
            (device / "device").write_text(f"0x{m[4]}\n")
            (device / "class").write_text(f"0x{m[2]}00\n")
        for path, local in (
            ("/sys/bus/pci/devices", devices),
            ("/sys/module/nvidia/version", t / "version"),
            ("/proc/driver/nvidia-nvswitch/devices", t / "nvswitch"),
        ):
            assert command.count(path) == 1, f"NvidiaHost changed ({path}): update this test"
            command = command.replace(path, shlex.quote(str(local)))
        stubs = {
            "uname": f'[ "$1" = -r ] && echo {KERNEL[distro]}',
            "systemd-detect-virt": "echo none; exit 1",
            "modinfo": "echo 'modinfo: ERROR: Module nvidia not found.' >&2; exit 1",
            "mokutil": "echo SecureBoot disabled",
        }
        for name, body in stubs.items():
            (bindir / name).write_text(f"#!/bin/sh\n{body}\n")
            (bindir / name).chmod(0o755)
        proc = subprocess.run(["sh", "-c", command], capture_output=True, text=True,
                              env={"PATH": f"{bindir}:/usr/bin:/bin"}, timeout=10)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert NvidiaHost().process(lines)["gpus"], "the fixture has GPUs"
    return lines


def driver_config(distro: str, **nvidia: Any) -> NodeConfig:
    raw = {
        "defaults": {"distro": distro, "nvidia": nvidia, "firewall": {"enabled": False}},
        "hosts": {"gpu-01": {"connection": {"address": "192.0.2.10"}}},
    }
    return load(raw, source="test_bites_runs").hosts["gpu-01"].config


def driver_only(distro: str, handlers: list[Any] | None = None, **nvidia: Any) -> Run:
    responses: dict[Any, Any] = {NvidiaHost().command(): gpu_state(distro)}
    run = run_deploys(driver_config(distro, **nvidia), responses, [nvidia_driver],
                      handlers or [])  # fmt: skip
    assert not run.failed or nvidia.get("reboot"), run.commands  # a reboot: asserted by callers
    return run


def held_by(command: str, family: str) -> list[str]:
    """The packages ``command`` (a hold) holds on a host with MATCHING and OTHERS
    installed, none held yet: run for real by sh, with dpkg-query/rpm stubs and the
    hold tool replaced by one that prints its arguments."""
    with tempfile.TemporaryDirectory() as tmp:
        bindir = Path(tmp)
        installed = [*MATCHING[family], *OTHERS]
        if family == "apt":
            listing = "".join(f"echo 'ii  {p}'\n" for p in installed)
            stubs = {"dpkg-query": listing, "apt-mark": 'shift; printf "%s\\n" "$@"'}
        else:
            listing = "".join(f"echo '{p}'\n" for p in installed)
            stubs = {"rpm": listing, "dnf": 'shift 2; printf "%s\\n" "$@"'}
        for name, body in stubs.items():
            (bindir / name).write_text(f"#!/bin/sh\n{body}")
            (bindir / name).chmod(0o755)
        proc = subprocess.run(["sh", "-c", command], capture_output=True, text=True,
                              env={"PATH": f"{bindir}:/usr/bin:/bin"}, timeout=10)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return sorted(proc.stdout.split())


HOLD_TOOL = {"apt": r"\| xargs -r apt-mark hold$", "dnf": r"\| xargs -r dnf versionlock add$"}


@pytest.mark.parametrize("distro", ["ubuntu2404", "rhel9"])
def test_the_driver_role_alone_holds_the_driver_after_installing_it(
    distro: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_clock(monkeypatch, server_ops)  # the reboot's waits pass at once
    family = "apt" if distro == "ubuntu2404" else "dnf"
    run = driver_only(distro, [booting()], reboot=True)
    assert not run.failed, run.commands
    holds = run.grep(HOLD_TOOL[family])
    assert holds, "the driver role holds nothing of its own"
    installs = run.grep(r"(apt-get|^dnf)( -y)? .*install .*nvidia")
    reboot = run.grep(r"\breboot\b")
    assert installs and reboot, run.commands
    first_hold = run.commands.index(holds[0])
    assert run.commands.index(installs[-1]) < first_hold < run.commands.index(reboot[0])
    for hold in holds:
        for pattern in HOLD_PATTERNS[family]:
            assert pattern in hold, f"{pattern} not held: {hold}"
        assert held_by(hold, family) == sorted(MATCHING[family])


def test_the_driver_role_alone_holds_installed_packages_that_are_not_held() -> None:
    """A host whose driver is installed (nothing to install) but not held: the plain hold,
    not the one after an install, holds it."""
    distro, family = "ubuntu2404", "apt"
    first = driver_only(distro)
    installed: set[str] = set()
    for command in first.grep(r"apt-get .*install "):
        installed |= {a for a in command.split(" install ", 1)[1].split() if a[0] != "-"}
    assert "nvidia-open-580" in installed
    listing = [f"ii  {p:<40} 1.0-1        amd64   -" for p in sorted(installed)]
    unheld = "\n".join(MATCHING[family])

    def host(command: str) -> Any:
        if "( dpkg -l )" in command:
            return listing
        if command.startswith("dpkg-query -W") and "apt-mark" not in command:
            return unheld  # the UnheldPackages fact: these are installed, not held
        return None

    run = driver_only(distro, handlers=[host])
    assert not run.grep(r"apt-get .*install .*nvidia"), "the driver was installed again"
    holds = run.grep(HOLD_TOOL[family])
    assert len(holds) == 1, f"the installed, unheld driver is held {len(holds)} times"
    assert held_by(holds[0], family) == sorted(MATCHING[family])
