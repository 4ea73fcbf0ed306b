"""gpunode.operations.files.private_file and secret_file through pyinfra's real API.

Most tests run the operation's commands for real on this machine (``@local``) in a
temporary directory; a recorder around the connector keeps every command line (and
whether it was escalated) and, at the moment of each upload, the owner and mode of the
file being written. So they show on real files what the lab's leak tests show over SSH:
owner and mode are final before any byte of content exists, the file is replaced by a
rename, a converged file is no change, nothing derived from the value is printed even
at ``-vvv`` (finding 12), a hostile path reaches the shell only quoted (finding 3), and
the staging directory and temporary file are gone after a failure (finding 13). The
escalated path (``--sudo``) runs for real through ``su root`` here, and through pyinfra's
``@fake`` connector where a failure must be forced at one exact command.
"""

from __future__ import annotations

import grp
import hashlib
import io
import logging
import os
import pwd
import shlex
import stat
from base64 import b64encode
from pathlib import Path
from typing import Any

import click
import pytest
from harness import RecordingFakeConnector
from pyinfra.api import Config, Inventory, State, output
from pyinfra.api.connect import connect_all
from pyinfra.api.exceptions import OperationValueError, PyinfraError
from pyinfra.api.operation import add_op
from pyinfra.api.operations import run_ops
from pyinfra.api.util import get_file_io
from pyinfra.connectors.local import LocalConnector

from gpunode.clients.vault import SecretValue
from gpunode.config import load
from gpunode.facts.files import PrivateFileState
from gpunode.operations.files import STAGING_PREFIX, MaskedBytes, private_file, secret_file
from gpunode.schema.types import ConfigError

CANARY = "canary-Zq8vYp3LrT5w"
USER = pwd.getpwuid(os.geteuid()).pw_name
GROUP = grp.getgrgid(os.getegid()).gr_name
# every shell character the old absolute-path type let through, and more
HOSTILE = "llm.env&id>pwned; $(id) `id` 'q' \"d\" |x <y (z)"


class Recorder:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.commands: list[str] = []
        self.escalated: list[bool] = []
        self.uploads: list[dict[str, Any]] = []
        self.copies: list[tuple[int, int, int]] = []  # the target of each copy, before it
        run_cmd = LocalConnector.run_shell_command
        put = LocalConnector.put_file
        recorder = self

        def run_shell_command(self, command, **kwargs):  # noqa: ANN001, ANN003, ANN202
            raw = command if isinstance(command, str) else command.get_raw_value()
            recorder.commands.append(raw)
            recorder.escalated.append(bool(kwargs.get("_su_user") or kwargs.get("_sudo")))
            if raw.startswith("cp -- "):  # the operation's copy into the temporary file
                st = os.stat(shlex.split(raw)[-1])
                recorder.copies.append((stat.S_IMODE(st.st_mode), st.st_uid, st.st_size))
            return run_cmd(self, command, **kwargs)

        def put_file(self, filename_or_io, remote_filename, **kwargs):  # noqa: ANN001, ANN003, ANN202
            st = os.stat(remote_filename)  # the target exists before the upload
            with get_file_io(filename_or_io) as f:
                content = f.read()
            f_io = io.BytesIO(content if isinstance(content, bytes) else content.encode())
            recorder.uploads.append(
                {
                    "path": remote_filename,
                    "mode": stat.S_IMODE(st.st_mode),
                    "uid": st.st_uid,
                    "size_before": st.st_size,
                    "content": f_io.getvalue(),
                    "escalated": bool(kwargs.get("_su_user") or kwargs.get("_sudo")),
                }
            )
            return put(self, f_io, remote_filename, **kwargs)

        monkeypatch.setattr(LocalConnector, "run_shell_command", run_shell_command)
        monkeypatch.setattr(LocalConnector, "put_file", put_file)


def local_state(verbose: bool = False) -> State:
    inventory = Inventory((["@local"], {}))
    state = State(inventory, Config())
    if verbose:  # what pyinfra -vvv sets
        for flag in ("print_fact_info", "print_noop_info", "print_input", "print_fact_input"):
            setattr(state, flag, True)
        state.print_output = state.print_fact_output = True
    connect_all(state)
    return state


def run(state: State, op: Any, **kw: Any) -> State:
    add_op(state, op, **kw)
    try:
        run_ops(state)
    except PyinfraError:  # "No hosts remaining": the only host failed
        pass
    return state


def deploy(path: Path, value: str, mode: str = "0640", verbose: bool = False, **kw: Any) -> State:
    secret = SecretValue("demo", 3, value)
    return run(
        local_state(verbose),
        secret_file,
        path=str(path),
        secret=secret,
        env="API_KEY",
        user=USER,
        group=GROUP,
        mode=mode,
        **kw,
    )


def changed(state: State) -> int:
    host = next(iter(state.inventory))
    return (
        state.get_results_for_host(host).success_ops - state.get_meta_for_host(host).ops_no_change
    )


def failed(state: State) -> bool:
    return next(iter(state.inventory)) in state.failed_hosts


def _stagings() -> set[str]:
    return {str(p) for p in Path("/tmp").glob(Path(STAGING_PREFIX).name + "*")}


_STAGINGS_BEFORE: set[str] = set()


@pytest.fixture(autouse=True)
def _stagings_before() -> None:
    """The staging directories /tmp already holds when a test starts (left by another run on
    this machine: a mutation run, say), which are not this test's leftovers."""
    _STAGINGS_BEFORE.clear()
    _STAGINGS_BEFORE.update(_stagings())


def leftovers(directory: Path) -> list[str]:
    """What ``directory`` holds, and the staging directories this test left in /tmp."""
    return sorted(p.name for p in directory.iterdir()) + sorted(_stagings() - _STAGINGS_BEFORE)


def test_writes_atomically_with_mode_first_and_no_value_on_any_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = Recorder(monkeypatch)
    target = tmp_path / "demo.env"
    target.write_text("API_KEY=old\n")
    old_inode = target.stat().st_ino
    deploy(target, CANARY, name="Secret file")
    assert target.read_text() == f"API_KEY={CANARY}\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert target.stat().st_ino != old_inode  # replaced by a rename, never rewritten in place
    # up into the login user's private staging file, then copied into a temporary file in
    # the same directory that already had its final owner and mode, then renamed
    [upload] = rec.uploads
    assert upload["path"].startswith(STAGING_PREFIX)
    assert (upload["mode"], upload["uid"], upload["size_before"]) == (0o600, os.geteuid(), 0)
    assert rec.copies == [(0o640, os.geteuid(), 0)]
    assert CANARY not in "\n".join(rec.commands)
    install = next(i for i, c in enumerate(rec.commands) if c.startswith("install -m 640"))
    copy = next(i for i, c in enumerate(rec.commands) if c.startswith("cp -- /tmp/"))
    move = next(i for i, c in enumerate(rec.commands) if c.startswith("mv -f"))
    assert install < copy < move
    tmp = str(tmp_path / ".demo.env.gpunode-new")
    assert shlex.split(rec.commands[move]) == ["mv", "-f", "--", tmp, str(target)]
    assert leftovers(tmp_path) == ["demo.env"]  # no temporary file, no staging left


def test_a_converged_file_is_no_change_and_owner_mode_drift_keeps_the_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "demo.env"
    deploy(target, CANARY, name="Secret file")
    inode = target.stat().st_ino
    rec = Recorder(monkeypatch)
    state = deploy(target, CANARY, name="Secret file")
    assert changed(state) == 0
    assert rec.uploads == [] and not any(c.startswith(("install", "mv")) for c in rec.commands)
    target.chmod(0o644)
    deploy(target, CANARY, name="Secret file")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert target.stat().st_ino == inode and rec.uploads == []  # chmod only, no re-upload
    # a looser mode never exists on the way: the shared bits first (604 & 640 = 600)
    rec.commands.clear()
    target.chmod(0o604)
    deploy(target, CANARY, name="Secret file")
    assert [c for c in rec.commands if c.startswith("chmod")] == [
        f"chmod 600 {shlex.quote(str(target))}",
        f"chmod 640 {shlex.quote(str(target))}",
    ]


def test_a_new_value_is_a_change(tmp_path: Path) -> None:
    target = tmp_path / "demo.env"
    deploy(target, CANARY, name="Secret file")
    state = deploy(target, CANARY + "-2", name="Secret file")
    assert changed(state) == 1
    assert target.read_text() == f"API_KEY={CANARY}-2\n"


def test_without_a_name_the_printed_arguments_are_masked(tmp_path: Path) -> None:
    state = deploy(tmp_path / "demo.env", CANARY)  # no name=: pyinfra prints the args
    [meta] = state.op_meta.values()
    shown = " ".join([*meta.names, *meta.args])
    assert CANARY not in shown
    assert "SecretValue('demo', version=3, value=*MASKED*)" in shown


def digests(data: bytes) -> list[str]:
    return [
        *(hashlib.new(algo, data).hexdigest() for algo in ("md5", "sha1", "sha256", "sha512")),
        b64encode(data).decode(),
    ]


def test_at_vvv_nothing_derived_from_the_value_is_printed(
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Finding 12: the old fact printed sha256("API_KEY=value\\n") under -vvv, an offline
    guessing oracle. Now only owner, group and mode, and "same"/"differs"."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(output, "_echo", click.echo)  # what the CLI installs: echo prints
    target = tmp_path / "demo.env"
    deploy(target, CANARY, verbose=True, name="Secret file")  # write
    deploy(target, CANARY, verbose=True, name="Secret file")  # converged
    out, err = capfd.readouterr()
    printed = "\n".join([out, err, caplog.text])
    line = f"API_KEY={CANARY}\n".encode()
    for derived in [*digests(line), *digests(CANARY.encode())]:
        assert derived not in printed, "a function of the value was printed"
    assert CANARY not in printed
    assert f"private file {target}: content same" in printed  # what -vvv does say
    assert "Loaded fact" in printed and "[@local] >>> " in printed  # -vvv was really on


def test_an_empty_value_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(OperationValueError, match=r"secret demo \(version 3\): the value is empty"):
        deploy(tmp_path / "demo.env", "")
    assert list(tmp_path.iterdir()) == []


def test_a_hostile_path_reaches_the_shell_only_quoted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 3, defence in depth: a path the schema would refuse, given straight to the
    operation, is one word of every command (shlex.split) and names exactly one file."""
    monkeypatch.chdir(tmp_path)  # where a `>pwned` redirection would land
    rec = Recorder(monkeypatch)
    target = tmp_path / HOSTILE
    deploy(target, CANARY, name="Secret file")
    deploy(target, CANARY, name="Secret file")  # converged: the fact and the read
    assert target.read_text() == f"API_KEY={CANARY}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [HOSTILE]  # no pwned, no y, ...
    tmp = str(tmp_path / f".{HOSTILE}.gpunode-new")
    naming = [c for c in rec.commands if "llm.env" in c]
    assert len(naming) >= 4, rec.commands
    for command in naming:
        words = shlex.split(command)
        assert str(target) in words or tmp in words, command
    fact = PrivateFileState().command(str(target))
    assert shlex.split(fact).count(str(target)) == 3


@pytest.fixture
def as_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs the unit tests as root: `su root` without a password")
        pytest.skip("needs root: the escalated path runs through `su root` without a password")


@pytest.mark.usefixtures("as_root")
def test_escalated_the_content_goes_through_a_private_staging_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--sudo`` (here ``_su_user=root``, which pyinfra handles the same way): SFTP runs as
    the login user into a 0700 staging directory; the escalated commands create the
    temporary file and copy into it; both the read and the write staging are removed."""
    rec = Recorder(monkeypatch)
    target = tmp_path / "demo.env"
    modes: list[int] = []
    put = LocalConnector.put_file

    def put_file(self, filename_or_io, remote_filename, **kwargs):  # noqa: ANN001, ANN003, ANN202
        modes.append(stat.S_IMODE(os.stat(os.path.dirname(remote_filename)).st_mode))
        return put(self, filename_or_io, remote_filename, **kwargs)

    monkeypatch.setattr(LocalConnector, "put_file", put_file)
    content = MaskedBytes("key", CANARY.encode())
    args = dict(path=str(target), content=content, user="root", group="root", mode="600")
    state = run(local_state(), private_file, _su_user="root", **args)
    assert not failed(state) and target.read_bytes() == CANARY.encode()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    [upload] = rec.uploads
    assert upload["path"].startswith(STAGING_PREFIX) and not upload["escalated"]
    assert (upload["mode"], upload["size_before"], modes) == (0o600, 0, [0o700])
    steps = list(zip(rec.commands, rec.escalated, strict=True))
    install = next(i for i, (c, e) in enumerate(steps) if c.startswith("install -m 600") and e)
    stage = next(i for i, (c, e) in enumerate(steps) if "mkdir -- /tmp/gpunode-secret-" in c)
    copy = next(i for i, (c, e) in enumerate(steps) if c.startswith("cp -- /tmp/") and e)
    assert not steps[stage][1] and install < stage < copy
    assert leftovers(tmp_path) == ["demo.env"]
    # converged: read back through a staging directory of its own, removed too
    rec.commands.clear()
    state = run(local_state(), private_file, _su_user="root", **args)
    assert changed(state) == 0 and len(rec.uploads) == 1
    assert any(c.startswith("cat -- ") for c in rec.commands)
    assert leftovers(tmp_path) == ["demo.env"]
    assert CANARY not in "\n".join(rec.commands)


def test_a_failed_upload_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "demo.env"
    deploy(target, CANARY, name="Secret file")
    inode = target.stat().st_ino

    def broken(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        raise OSError("connection lost (injected)")

    monkeypatch.setattr(LocalConnector, "put_file", broken)
    state = deploy(target, CANARY + "-2", name="Secret file")
    assert failed(state)
    assert target.read_text() == f"API_KEY={CANARY}\n" and target.stat().st_ino == inode
    assert leftovers(tmp_path) == ["demo.env"]


class EscalationRecorder(RecordingFakeConnector):
    """The fake host, also recording which commands ran escalated (``_sudo``)."""

    def __init__(self, state, host) -> None:  # noqa: ANN001
        super().__init__(state, host)
        self.escalated: list[bool] = []

    def run_shell_command(self, command, print_output=False, print_input=False, **arguments):  # noqa: ANN001, ANN201
        self.escalated.append(bool(arguments.get("_sudo")))
        return super().run_shell_command(command, print_output, print_input, **arguments)


def fake_run(fail: str | None) -> tuple[EscalationRecorder, bool]:
    """private_file with ``_sudo`` on a fake host where an existing file differs and the
    command starting with ``fail`` fails."""
    data = {
        "fake_delay": 0,
        "fake_delay_jitter": 0,
        "fake_responses": {"stat -c 'file %U %G %a'": "file root root 600"},
    }
    inventory = Inventory(([("@fake/gpu-01", data)], {}))
    for each in inventory:
        each.connector_cls = EscalationRecorder
    state = State(inventory, Config())
    host = inventory.get_host("@fake/gpu-01")
    connector = host.connector
    assert isinstance(connector, EscalationRecorder)
    if fail:
        connector.handlers = [lambda c: {"success": False} if c.startswith(fail) else None]
    connect_all(state)
    run(
        state,
        private_file,
        path="/etc/gpunode/secrets/demo.env",
        content=MaskedBytes("demo", CANARY.encode()),
        user="root",
        group="root",
        mode="0640",
        _sudo=True,
    )
    return connector, host in state.failed_hosts


@pytest.mark.parametrize("fail", [None, "cp -- ", "cat -- "])
def test_escalated_staging_is_removed_on_every_path(fail: str | None) -> None:
    """Finding 13: with --sudo, pyinfra's own upload left /tmp/gpunode-secret-* behind when
    its sudo cp failed. Whatever fails, every staging directory made is removed, and the
    temporary file too unless the rename ran."""
    conn, did_fail = fake_run(fail)
    steps = list(zip(conn.executed_commands, conn.escalated, strict=True))
    made = [c.split()[5] for c, e in steps if c.startswith("umask 077 && mkdir -- ")]
    removed = [c.split()[3] for c, e in steps if c.startswith("rm -rf -- ") and not e]
    assert made and removed == made, steps  # the read's staging and the write's
    assert all(not e for c, e in steps if "mkdir -- /tmp/" in c)  # the login user's own
    tmp = "/etc/gpunode/secrets/.demo.env.gpunode-new"
    install = next(i for i, (c, e) in enumerate(steps) if c.startswith("install -m 640") and e)
    upload = next(p for p, _ in conn.uploads if p.startswith(STAGING_PREFIX))
    copy = next((i for i, (c, e) in enumerate(steps) if c == f"cp -- {upload} {tmp}" and e), None)
    moved = any(c.startswith("mv -f -- ") for c, _ in steps)
    cleaned = (f"rm -f -- {tmp}", True) in steps
    if fail == "cp -- ":
        assert did_fail and copy is not None and install < copy and not moved and cleaned
    else:  # a failed read is "differs": the file is written
        assert not did_fail and copy is not None and install < copy and moved and not cleaned
    assert CANARY not in "\n".join(conn.executed_commands)


def test_a_hostile_secret_dest_is_refused_at_load_naming_the_key() -> None:
    """Finding 3: this dest passed `gpunode check` and, through @local, wrote uid=0(root)
    into pwned. The path type refuses it now, naming the key and what is allowed."""
    raw = {
        "defaults": {
            "distro": "debian12",
            "firewall": {"enabled": False},
            "vault": {"addr": "https://127.0.0.1:8200"},
            "secrets": {
                "llm": {
                    "path": "gpunode/llm",
                    "key": "api_key",
                    "dest": "/etc/gpunode/secrets/llm.env&id>/root/pwned",
                }
            },
        },
        "hosts": {"gpu-01": {"connection": {"address": "192.0.2.10"}}},
    }
    with pytest.raises(ConfigError) as info:
        load(raw, source="inv.yml")
    message = str(info.value)
    assert message.startswith("inv.yml: defaults: secrets.llm.dest: "), message
    assert "(allowed: an absolute path" in message
