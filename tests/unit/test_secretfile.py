"""gpunode.operations.files.secret_file through pyinfra's real API on this machine (@local).

The operation's commands (install, upload, mv, chown/chmod) run for real here in a
temporary directory; a recorder around the connector keeps every command line and, at
the moment of each upload, the owner and mode of the file being written. So these tests
show on real files what the lab's leak test shows over SSH: owner and mode are final
before any byte of content exists, the file is replaced by a rename, a converged file
is no change, and the value is on no command line and in no operation argument.
"""

from __future__ import annotations

import grp
import io
import os
import pwd
import stat
from pathlib import Path
from typing import Any

import pytest
from pyinfra.api import Config, Inventory, State
from pyinfra.api.connect import connect_all
from pyinfra.api.operations import run_ops
from pyinfra.api.util import get_file_io
from pyinfra.connectors.local import LocalConnector

from gpunode.clients.vault import SecretValue
from gpunode.operations.files import secret_file

CANARY = "canary-Zq8vYp3LrT5w"
USER = pwd.getpwuid(os.geteuid()).pw_name
GROUP = grp.getgrgid(os.getegid()).gr_name


class Recorder:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.commands: list[str] = []
        self.uploads: list[dict[str, Any]] = []
        run_cmd = LocalConnector.run_shell_command
        put = LocalConnector.put_file
        recorder = self

        def run_shell_command(self, command, **kwargs):  # noqa: ANN001, ANN003, ANN202
            recorder.commands.append(
                command if isinstance(command, str) else command.get_raw_value()
            )
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
                }
            )
            return put(self, f_io, remote_filename, **kwargs)

        monkeypatch.setattr(LocalConnector, "run_shell_command", run_shell_command)
        monkeypatch.setattr(LocalConnector, "put_file", put_file)


def deploy(path: Path, value: str, mode: str = "0640", **kw: Any) -> State:
    inventory = Inventory((["@local"], {}))
    state = State(inventory, Config())
    connect_all(state)
    from pyinfra.api.operation import add_op

    add_op(
        state,
        secret_file,
        path=str(path),
        secret=SecretValue("demo", 3, value),
        env="API_KEY",
        user=USER,
        group=GROUP,
        mode=mode,
        **kw,
    )
    run_ops(state)
    return state


def changed(state: State) -> int:
    host = next(iter(state.inventory))
    return (
        state.get_results_for_host(host).success_ops - state.get_meta_for_host(host).ops_no_change
    )


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
    [upload] = rec.uploads
    assert upload["path"] == str(tmp_path / ".demo.env.gpunode-new")  # same directory
    assert (upload["mode"], upload["uid"], upload["size_before"]) == (0o640, os.geteuid(), 0)
    assert CANARY not in "\n".join(rec.commands)
    install = next(i for i, c in enumerate(rec.commands) if c.startswith("install -m 640"))
    move = next(i for i, c in enumerate(rec.commands) if c.startswith("mv -f"))
    assert install < move
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.env"]  # no temporary left


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
