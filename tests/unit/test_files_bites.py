"""Issue 18, tests that bite: gpunode/operations/files.py as a user relies on it.

Mutation testing (``make mutate``, module ``files``) found behaviour of ``private_file``,
``secret_file``, ``file_mode`` and ``checked_install`` that no unit test pinned. Each test
here runs the operation for real on this machine (pyinfra's ``@local`` connector, real
``sh``, real files in a temporary directory), recording every command and upload with
test_secretfile's ``Recorder``:

* the mode given is checked and normalised (``0600`` -> ``600``, ``0`` -> ``000``); a bad
  one is refused before anything runs, naming the mode and what is allowed;
* something that is not a regular file in the way is refused, naming the path;
* the temporary file is created by one exact ``install`` command (owner, group, mode, ``-T``)
  before any content; the content goes up into a fresh 0700 staging directory's empty 0600
  file; the staging directory is removed on every path (checked by its own name, not by a
  glob of /tmp that a concurrent run could fill);
* a failed ``install`` (an unknown user) or a failed upload leaves the old file, no
  temporary file, no staging, and says why without the value;
* content that is already right: owner and mode only, never looser on the way, and a second
  run is no change; an unreadable current content is "differs" and the file is rewritten;
* ``file_mode`` sets owner and mode (``000`` included), leaves a missing file missing, and
  is no change once converged;
* ``checked_install`` stages beside the target with owner and mode before content, lets the
  checker decide, and is no change when the file is as wanted.
"""

from __future__ import annotations

import logging
import os
import shlex
import stat
from pathlib import Path
from typing import Any

import click
import pytest
from harness import need_root
from pyinfra.api import operation, output
from pyinfra.api.exceptions import OperationError, OperationValueError
from pyinfra.connectors.local import LocalConnector
from test_secretfile import (
    CANARY,
    GROUP,
    USER,
    Recorder,
    changed,
    failed,
    local_state,
    run,
)

from gpunode.operations.files import (
    STAGING_PREFIX,
    MaskedBytes,
    checked_install,
    file_mode,
    private_file,
)


def write(path: Path, data: bytes = CANARY.encode(), mode: str = "0640", **kw: Any) -> Any:
    content = MaskedBytes("demo key", data)
    return run(
        local_state(kw.pop("verbose", False)),
        private_file,
        name="Private file",
        path=str(path),
        content=content,
        user=kw.pop("user", USER),
        group=kw.pop("group", GROUP),
        mode=mode,
        **kw,
    )


def stagings(commands: list[str]) -> list[str]:
    """The staging directories the commands made (``umask 077 && mkdir -- STAGE && ...``)."""
    made = [shlex.split(c) for c in commands if c.startswith("umask 077 && mkdir -- ")]
    return [words[5] for words in made]


def assert_staging_removed(commands: list[str]) -> None:
    made = stagings(commands)
    assert made, commands
    for stage in made:
        assert stage.startswith(STAGING_PREFIX) and len(stage) == len(STAGING_PREFIX) + 16
        assert not os.path.exists(stage), f"{stage} left behind"
        assert f"rm -rf -- {stage}" in commands


# --- the mode -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "octal"), [("0600", "600"), ("640", "640"), ("0", "000"), ("0000", "000"),
                         ("7", "007"), ("0750", "750")]
)  # fmt: skip
def test_the_mode_is_normalised_and_set_before_any_content(
    given: str, octal: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not int(octal, 8) & 0o400:
        need_root("reading back a file whose owner may not read it")
    rec = Recorder(monkeypatch)
    target = tmp_path / "key"
    state = write(target, mode=given)
    assert not failed(state) and target.read_bytes() == CANARY.encode()
    assert f"{stat.S_IMODE(target.stat().st_mode):03o}" == octal
    tmp = str(tmp_path / ".key.gpunode-new")
    [install] = [c for c in rec.commands if c.startswith("install ")]
    assert shlex.split(install) == [
        "install", "-m", octal, "-o", USER, "-g", GROUP, "-T", "--", "/dev/null", tmp,
    ]  # fmt: skip
    assert rec.copies == [(int(octal, 8), os.geteuid(), 0)]  # final mode, still empty
    assert changed(write(target, mode=given)) == 0  # converged with the same mode


@pytest.mark.parametrize("mode", ["", "00600", "0689", "rw", "-600", "6 0"])
def test_a_bad_mode_is_refused_before_anything_runs(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = Recorder(monkeypatch)
    with pytest.raises(OperationValueError) as info:
        write(tmp_path / "key", mode=mode)
    assert str(info.value) == f"mode {mode!r} (allowed: an octal mode such as 0600)"
    assert rec.commands == [] and list(tmp_path.iterdir()) == []


def test_a_directory_in_the_way_is_refused_naming_it(tmp_path: Path) -> None:
    target = tmp_path / "key"
    target.mkdir()
    with pytest.raises(OperationError) as info:
        write(target)
    assert str(info.value) == f"{target} exists and is not a regular file (allowed: a file)"
    assert target.is_dir() and list(target.iterdir()) == []


# --- the write ------------------------------------------------------------------------------


def test_the_content_goes_up_into_a_private_staging_directory_then_is_renamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = Recorder(monkeypatch)
    seen: list[tuple[int, int, bool]] = []
    put = LocalConnector.put_file

    def put_file(self, filename_or_io, remote_filename, **kwargs):  # noqa: ANN001, ANN003, ANN202
        directory = os.stat(os.path.dirname(remote_filename))
        seen.append((stat.S_IMODE(directory.st_mode), directory.st_uid, "_sudo" in kwargs))
        return put(self, filename_or_io, remote_filename, **kwargs)

    monkeypatch.setattr(LocalConnector, "put_file", put_file)
    target = tmp_path / "key"
    target.write_bytes(b"old")
    state = write(target, data=b"new \x00\xff bytes\n")
    assert not failed(state) and changed(state) == 1
    assert target.read_bytes() == b"new \x00\xff bytes\n"
    start = next(i for i, c in enumerate(rec.commands) if c.startswith("install "))
    [stage] = stagings(rec.commands[start:])  # the write's (the read's came before)
    [upload] = rec.uploads
    assert upload["path"] == f"{stage}/f" and upload["content"] == b"new \x00\xff bytes\n"
    assert (upload["mode"], upload["size_before"]) == (0o600, 0)
    assert seen == [(0o700, os.geteuid(), False)]
    tmp = str(tmp_path / ".key.gpunode-new")
    steps = [shlex.split(c)[:2] for c in rec.commands]
    copy = rec.commands.index(f"cp -- {stage}/f {tmp}")
    move = rec.commands.index(f"mv -f -- {tmp} {target}")
    assert copy < move < rec.commands.index(f"rm -rf -- {stage}")
    assert ["rm", "-f"] not in steps  # the rename took the temporary file
    assert_staging_removed(rec.commands)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]


def test_an_install_that_fails_leaves_the_old_file_and_no_staging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An unknown owner: ``install`` fails before any staging exists; its error is shown
    (as pyinfra shows a failed command's), the temporary file is removed."""
    rec = Recorder(monkeypatch)
    target = tmp_path / "key"
    target.write_bytes(b"old")
    inode = target.stat().st_ino
    caplog.set_level(logging.DEBUG)
    state = write(target, user="no-such-user-gpunode")
    assert failed(state)
    assert target.read_bytes() == b"old" and target.stat().st_ino == inode
    start = next(i for i, c in enumerate(rec.commands) if c.startswith("install"))
    write_part = rec.commands[start:]
    assert stagings(write_part) == [] and rec.uploads == []
    assert write_part[-1] == f"rm -f -- {tmp_path / '.key.gpunode-new'}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]
    # install's own message, shown once (as pyinfra shows a failed command's output)
    assert caplog.text.count("install: invalid user") == 1
    assert CANARY not in caplog.text


def test_a_failed_upload_is_reported_by_class_and_cleaned_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    rec = Recorder(monkeypatch)

    def broken(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        raise OSError("connection lost (injected)")

    monkeypatch.setattr(LocalConnector, "put_file", broken)
    target = tmp_path / "key"
    state = write(target)
    assert failed(state) and not target.exists()
    assert f"private file {target}: OSError: connection lost (injected)" in caplog.text
    assert CANARY not in caplog.text
    assert_staging_removed(rec.commands)
    assert rec.commands[-1] == f"rm -f -- {tmp_path / '.key.gpunode-new'}"
    assert list(tmp_path.iterdir()) == []


# --- a converged file -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "want", "chmods"),
    [
        ("0604", "0640", ["600", "640"]),  # the shared bits first: never 0644 on the way
        ("0640", "0600", ["600"]),  # tighter: one chmod
        ("0600", "0640", ["640"]),  # looser: one chmod, after the owner
        ("0640", "0640", []),
    ],
)
def test_right_content_gets_owner_and_mode_only_never_looser_on_the_way(
    old: str, want: str, chmods: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need_root("giving the file to nobody, then back to root")
    target = tmp_path / "key"
    target.write_bytes(CANARY.encode())
    os.chown(target, 65534, 65534)  # nobody:nogroup, wanted root's
    target.chmod(int(old, 8))
    inode = target.stat().st_ino
    rec = Recorder(monkeypatch)
    state = write(target, mode=want, user="root", group="root")
    assert not failed(state) and changed(state) == 1
    st = target.stat()
    assert (st.st_ino, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (
        inode, 0, 0, int(want, 8))  # fmt: skip
    assert rec.uploads == [] and target.read_bytes() == CANARY.encode()
    q = shlex.quote(str(target))
    changes = [c for c in rec.commands if c.startswith(("chmod", "chown", "install", "mv"))]
    expected = [f"chmod {m} {q}" for m in chmods]
    if want == "0640" and old != "0640":  # looser: the owner before the wider mode
        expected.insert(len(chmods) - 1, f"chown root:root {q}")
    else:
        expected.insert(len(chmods), f"chown root:root {q}")
    assert changes == expected
    assert_staging_removed(rec.commands)  # the read's staging
    rec.commands.clear()
    again = write(target, mode=want, user="root", group="root")
    assert changed(again) == 0
    assert not [c for c in rec.commands if c.startswith(("chmod", "chown", "install", "mv"))]


def test_a_file_whose_content_cannot_be_read_is_rewritten(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The read fails (SFTP error): "differs", so the file is written again; the read's
    staging is removed and nothing of the failure is printed as a failed command."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(output, "_echo", click.echo)
    target = tmp_path / "key"
    write(target)
    inode = target.stat().st_ino
    rec = Recorder(monkeypatch)

    def broken(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        raise OSError("read lost (injected)")

    monkeypatch.setattr(LocalConnector, "get_file", broken)
    state = write(target, verbose=True)
    assert not failed(state) and changed(state) == 1
    assert target.read_bytes() == CANARY.encode() and target.stat().st_ino != inode
    assert len(stagings(rec.commands)) >= 2  # the read's (each time it ran) and the write's
    assert_staging_removed(rec.commands)
    out, err = capfd.readouterr()
    assert f"private file {target}: content differs" in out + err + caplog.text


def test_a_file_the_cat_cannot_read_is_rewritten_quietly(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``cat`` fails (here: a fake ``cat`` on PATH that fails): the file is rewritten and the
    failed read prints nothing (it is quiet: only a failed write is shown)."""
    target = tmp_path / "key"
    write(target)
    inode = target.stat().st_ino
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "cat"
    fake.write_text("#!/bin/sh\necho 'cat: injected failure' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setattr(output, "_echo", click.echo)
    capfd.readouterr()
    caplog.set_level(logging.DEBUG)
    state = write(target)
    assert not failed(state) and changed(state) == 1
    assert target.stat().st_ino != inode and target.read_bytes() == CANARY.encode()
    out, err = capfd.readouterr()
    assert "injected failure" not in out + err + caplog.text


# --- file_mode --------------------------------------------------------------------------------


def test_file_mode_sets_owner_and_mode_zero_included_and_then_is_no_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need_root("giving a file to nobody:nogroup")
    target = tmp_path / "shadow"
    target.write_text("x")
    target.chmod(0o644)
    rec = Recorder(monkeypatch)
    args = dict(name="shadow", path=str(target), user="nobody", group="nogroup", mode="000")
    state = run(local_state(), file_mode, **args)
    assert not failed(state) and changed(state) == 1
    st = target.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0)
    q = shlex.quote(str(target))
    assert [c for c in rec.commands if c.startswith(("chmod", "chown"))] == [
        f"chown nobody:nogroup {q}",
        f"chmod 000 {q}",
    ]
    rec.commands.clear()
    assert changed(run(local_state(), file_mode, **args)) == 0
    assert not [c for c in rec.commands if c.startswith(("chmod", "chown"))]
    # the mode alone, then the owner alone
    target.chmod(0o600)
    run(local_state(), file_mode, **args)
    assert [c for c in rec.commands if c.startswith(("chmod", "chown"))] == [f"chmod 000 {q}"]
    rec.commands.clear()
    os.chown(target, 0, 65534)
    run(local_state(), file_mode, **args)
    assert [c for c in rec.commands if c.startswith(("chmod", "chown"))] == [
        f"chown nobody:nogroup {q}"
    ]
    rec.commands.clear()
    os.chown(target, 65534, 0)  # the group alone differs
    run(local_state(), file_mode, **args)
    assert [c for c in rec.commands if c.startswith(("chmod", "chown"))] == [
        f"chown nobody:nogroup {q}"
    ]
    assert target.stat().st_gid == 65534


def test_file_mode_leaves_a_missing_file_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = Recorder(monkeypatch)
    target = tmp_path / "absent"
    state = run(local_state(), file_mode, path=str(target), user="root", group="root", mode="0")
    assert not failed(state) and changed(state) == 0
    assert not target.exists() and not [c for c in rec.commands if c.startswith("ch")]


# --- checked_install ------------------------------------------------------------------------


def checker(staged: str, path: str) -> str:
    """Accept a staged file that says ``ok``; else remove it and fail."""
    s, p = shlex.quote(staged), shlex.quote(path)
    return f"if grep -q ok {s}; then mv -f {s} {p}; else rm -f {s}; exit 1; fi"


@operation()
def checked(path: str, content: str):
    yield from checked_install(path, content, "640", checker)


def test_checked_install_stages_with_mode_first_and_lets_the_checker_decide(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    need_root("installing a root:root file")
    target = tmp_path / "conf"
    rec = Recorder(monkeypatch)
    state = run(local_state(), checked, path=str(target), content="ok 1\n")
    assert not failed(state) and target.read_text() == "ok 1\n"
    st = target.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o640)
    staged = str(tmp_path / ".conf.gpunode-new")
    [upload] = rec.uploads
    assert upload["path"] == staged and upload["content"] == b"ok 1\n"
    assert (upload["mode"], upload["uid"], upload["size_before"]) == (0o640, 0, 0)
    [install] = [c for c in rec.commands if c.startswith("install ")]
    assert shlex.split(install) == [
        "install", "-m", "640", "-o", "root", "-g", "root", "/dev/null", staged,
    ]  # fmt: skip
    # as wanted: no change, nothing staged, and -v says so, naming the file
    rec.commands.clear()
    caplog.set_level(logging.DEBUG)
    state = run(local_state(verbose=True), checked, path=str(target), content="ok 1\n")
    assert f"{target} is as wanted" in caplog.text
    assert changed(state) == 0 and len(rec.uploads) == 1  # the first run's upload only
    assert not [c for c in rec.commands if not c.startswith("test -f ")], rec.commands
    # each of owner, mode and content differing is a change
    for undo in (lambda: target.chmod(0o644), lambda: os.chown(target, 0, 65534),
                 lambda: os.chown(target, 65534, 0)):  # fmt: skip
        undo()
        assert changed(run(local_state(), checked, path=str(target), content="ok 1\n")) == 1
        st = target.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o640)
    assert changed(run(local_state(), checked, path=str(target), content="ok 2\n")) == 1
    assert target.read_text() == "ok 2\n"
    # refused by the checker: the file stays, the staged file is gone, the op fails
    state = run(local_state(), checked, path=str(target), content="bad\n")
    assert failed(state) and target.read_text() == "ok 2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf"]
