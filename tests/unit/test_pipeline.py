"""Fact pipelining (gpunode/pipeline.py) is exact: same facts, same plan, same run.

Everything here is real: the batch script runs in a real ``sh``, deploys run through
pyinfra's API (gpunode.commands.run) on its ``@local`` connector, so every fact command
and operation is a real ``sh`` subprocess on this machine, over files under ``tmp_path``.
Remote commands are counted at the connector (``LocalConnector.run_shell_command``),
below the pipeline's wrappers of ``Host``, so a batch is one command there.

- the batch script and its parser: each command's section (stdout, stderr, status) is
  what the same command prints alone (``sh -c``), for outputs and commands built to
  break the framing; a cut, duplicated or garbled output answers nothing;
- end to end: a converged host costs exactly two commands (one batch to plan, one to
  execute), and the plan and the run are the same with the pipeline on and off, for a
  converged host and after drift made by hand;
- invalidation: what an operation changes, a later operation's facts see;
- fallback: a batch that fails answers nothing and the facts are read one by one;
- secrets: a fact command with a masked part is never batched nor written down;
- the switch: ``GPUNODE_FACT_PIPELINE=0`` runs no batch and writes no wishlist;
- the pyinfra internals the pipeline wraps are still where it expects them.

tests/unit/conftest.py turns the pipeline off for unit tests; the tests here turn it on
(``GPUNODE_FACT_PIPELINE=1``) with a wishlist cache under ``tmp_path``.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import re
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyinfra.api.facts as pyinfra_facts
import pytest
from harness import need_root
from pyinfra.api.command import FileUploadCommand, StringCommand
from pyinfra.api.host import Host
from pyinfra.api.state import BaseStateCallback, State, StateStage
from pyinfra.connectors.local import LocalConnector
from pyinfra.connectors.util import CommandOutput, OutputLine

from gpunode import pipeline
from gpunode.commands import run
from gpunode.pipeline import MARK, batch_script, parse_batch

HOST = "@local"
MOVED = (
    "pyinfra internals moved: gpunode/pipeline.py needs updating (pyproject pins pyinfra>=3.10,<4)"
)
SHELL_TIMEOUT = 30  # seconds: a command waiting on stdin would hang without one


# --- helpers --------------------------------------------------------------------------


def pyinfra_lines(data: bytes) -> list[str]:
    """Output split the way pyinfra's connectors split it: on "\\n", which is stripped."""
    return [line.rstrip(b"\n").decode() for line in io.BytesIO(data)]


@dataclass(frozen=True)
class Section:
    status: bool
    stdout: list[str]
    stderr: list[str]


def alone(command: str, success: tuple[int, ...] = (0,)) -> Section:
    """What one command gives run by itself, as pyinfra runs it (``sh -c``, stdin closed)."""
    proc = subprocess.run(
        ["sh", "-c", command],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=SHELL_TIMEOUT,
    )
    return Section(
        proc.returncode in success, pyinfra_lines(proc.stdout), pyinfra_lines(proc.stderr)
    )


def batched(commands: list[str], success: tuple[int, ...] = (0,)) -> dict[int, Section]:
    """Every command's section of one batch run in a real ``sh -c``."""
    proc = subprocess.run(
        ["sh", "-c", batch_script(commands)],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=SHELL_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    return {
        index: Section(
            status,
            [line.line for line in lines if line.buffer_name == "stdout"],
            [line.line for line in lines if line.buffer_name == "stderr"],
        )
        for index, (status, lines) in parse_batch(
            pyinfra_lines(proc.stdout), len(commands), success
        ).items()
    }


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def deploy_file(tmp_path: Path, name: str, body: str) -> Path:
    """A deploy file under tmp_path that turns pipelining on first, like deploys/*.py."""
    head = "from gpunode import pipeline\n\npipeline.install()\n\n"
    return write(tmp_path / "deploys" / f"{name}.py", head + body)


def tree(root: Path) -> dict[str, tuple[str, str, bytes | None]]:
    """Type, mode and content of everything under root: the host's state that matters."""
    out: dict[str, tuple[str, str, bytes | None]] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        kind = "dir" if stat.S_ISDIR(info.st_mode) else "file"
        out[str(path.relative_to(root))] = (
            kind,
            oct(info.st_mode & 0o7777),
            path.read_bytes() if kind == "file" else None,
        )
    return out


def unique(command: str) -> str:
    """A command without the random name of the temporary file @local uploads from."""
    return re.sub(r"/tmp/tmp\w+ ", "/tmp/TMP ", command)


def counts() -> tuple[int, int, int]:
    """(batches, served, direct) so far for @local: stats() is a process-wide total."""
    now = pipeline.stats()
    return (now.batches.get(HOST, 0), now.served.get(HOST, 0), now.direct.get(HOST, 0))


@dataclass
class Outcome:
    changes: list[str]  # the plan: operations that would change
    executed: list[str]  # operations that changed something when executed
    error: str | None
    commands: list[str]  # every command the connector ran, in order
    batches: int
    served: int
    direct: int

    @property
    def batch_commands(self) -> list[str]:
        return [c for c in self.commands if MARK in c]


class Connector:
    """Every command @local's connector runs, recorded below the pipeline's wrappers."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.commands: list[str] = []
        original = LocalConnector.run_shell_command

        def run_shell_command(self_: LocalConnector, command: Any, *args: Any, **kw: Any) -> Any:
            text = command.get_raw_value() if isinstance(command, StringCommand) else command
            self.commands.append(str(text))
            return original(self_, command, *args, **kw)

        monkeypatch.setattr(LocalConnector, "run_shell_command", run_shell_command)

    def deploy(
        self,
        inventory: Path,
        deploy: Path,
        *,
        execute: bool = True,
        between: Callable[[], None] | None = None,
    ) -> Outcome:
        """Plan (with change detection) and, with ``execute``, run the deploy on @local;
        ``between`` runs after the plan, before the execution."""
        start, (batches, served, direct) = len(self.commands), counts()
        with run.prepare(run.load_inventory(inventory), deploy) as planned:
            plan = planned.results()[HOST]
            if between:
                between()
            done = planned.execute()[HOST] if execute else plan
        after = counts()
        return Outcome(
            changes=plan.changes,
            executed=done.executed,
            error=done.error,
            commands=self.commands[start:],
            batches=after[0] - batches,
            served=after[1] - served,
            direct=after[2] - direct,
        )


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Pipelining on, its wishlists under tmp_path."""
    monkeypatch.setenv(pipeline.ENV_SWITCH, "1")
    monkeypatch.setenv(pipeline.ENV_CACHE, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def connector(monkeypatch: pytest.MonkeyPatch) -> Connector:
    return Connector(monkeypatch)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "host"
    path.mkdir()
    return path


@pytest.fixture
def inventory(tmp_path: Path, root: Path) -> Path:
    return write(tmp_path / "inventory.py", f"nodes = [({HOST!r}, {{'root': {str(root)!r}}})]\n")


def switch(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    monkeypatch.setenv(pipeline.ENV_SWITCH, "1" if on else "0")


def wishlists(cache: Path) -> list[Path]:
    return sorted((cache / "facts").glob("*.json")) if (cache / "facts").is_dir() else []


# --- 1. the batch script, through a real sh -------------------------------------------

HEREDOC = "cat <<'EOF'\nfirst line\n@@gpunode-fact 0 0\n@@gpunode-fact end\nEOF"

ROUND_TRIP: dict[str, str] = {
    "no trailing newline": "printf 'no newline'",
    "two lines, no trailing newline": "printf 'one\\ntwo'",
    "empty output": "true",
    "empty lines": "printf '\\n\\n\\n'",
    "only stderr": "echo 'to stderr' >&2",
    "stderr without newline": "printf 'err' >&2; printf 'out'",
    "both, interleaved": "echo o1; echo e1 >&2; echo o2; echo e2 >&2",
    "non-zero exit": "echo failing; echo why >&2; false",
    "exit 1": "echo one; exit 1",
    "marker lines on stdout": "echo '@@gpunode-fact 0 0'; echo '@@gpunode-fact end'",
    "marker lines on stderr": "echo '@@gpunode-fact 1 0' >&2; echo '@@gpunode-fact end' >&2",
    "prefix-like lines": "echo 'o '; echo e; echo o; echo 'e x'",
    "heredoc": HEREDOC,
    "unbalanced quotes inside quoted strings": "echo \"it's ( not\"; echo 'say \"hi )'",
    "exit 3 mid-command": "echo before; exit 3; echo after",
    "reads stdin (cat)": "cat",
    "reads stdin (read)": 'read line; echo "status $? line [$line]"',
    "trailing comment": "echo hi # a comment",
    "carriage return": "printf 'a\\r\\nb\\r'",
    "utf-8": "printf 'caf\\303\\251\\n'",
    "long line": "printf '%05000d\\n' 7",
    "exec": "exec echo replaced",
    "stdout closed": "exec >&-; echo closed >&2",
    "exit trap": "trap 'echo trapped' EXIT; echo body",
    "cd": "cd / && pwd",
    "set -e": "set -e; false; echo not reached",
    "status of the last command": "echo $?",
    # the batch's own names must not leak into a command
    "a variable named d": 'echo "[${d-unset}]"',
    "a function named p": "command -v p || echo none",
    # dash reads a trailing backslash at the end of the command literally
    "trailing backslash": "echo a \\",
}


def test_every_section_is_what_the_command_prints_alone() -> None:
    commands = list(ROUND_TRIP.values())
    sections = batched(commands)
    assert set(sections) == set(range(len(commands)))
    differ = [w for i, (w, c) in enumerate(ROUND_TRIP.items()) if sections[i] != alone(c)]
    assert differ == []


@pytest.mark.parametrize(("what", "command"), list(ROUND_TRIP.items()), ids=list(ROUND_TRIP))
def test_one_section_each(what: str, command: str) -> None:
    # the same, one command per batch among neighbours: a failure names its case
    commands = ["echo before", command, "echo after"]
    sections = batched(commands)
    assert sections == {0: alone("echo before"), 1: alone(command), 2: alone("echo after")}, what


def test_exit_status_against_success_codes() -> None:
    commands = ["true", "exit 1", "exit 2", "echo x; false"]
    assert [s.status for s in batched(commands).values()] == [True, False, False, False]
    relaxed = batched(commands, success=(0, 1))
    assert [s.status for s in relaxed.values()] == [True, True, False, True]
    for index, command in enumerate(commands):
        assert relaxed[index] == alone(command, success=(0, 1))


def test_a_command_reading_stdin_gets_eof_and_the_batch_does_not_hang() -> None:
    # the batch's own stdin stays open (a pipe nobody writes to, as over SSH): only the
    # batch's </dev/null gives each command its EOF
    script = batch_script(["cat", "head -c 1; echo done", "read x || echo eof"])
    proc = subprocess.Popen(["sh", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.wait(timeout=SHELL_TIMEOUT)
        out = proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
    sections = parse_batch(pyinfra_lines(out), 3)
    assert [[line.line for line in s[1]] for s in sections.values()] == [[], ["done"], ["eof"]]


def test_exit_inside_a_command_ends_only_its_own_subshell() -> None:
    sections = batched(["exit 3", "echo still running", "exit 0"])
    assert [s.status for s in sections.values()] == [False, True, True]
    assert sections[1].stdout == ["still running"]


def test_the_script_leaves_no_temporary_directory(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    subprocess.run(
        ["sh", "-c", batch_script(["echo x", "exit 4"])],
        env=env,
        check=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=SHELL_TIMEOUT,
    )
    assert list(tmp_path.iterdir()) == []


def test_real_fact_commands_read_the_same_batched_and_alone(tmp_path: Path) -> None:
    # pyinfra's own fact commands (quoted paths with spaces, quotes and newlines)
    from pyinfra.facts.files import Directory, File, FindFiles, Sha1File

    odd = tmp_path / 'it\'s a "file"\nwith a newline'
    odd.write_text("content\n")
    odd.chmod(0o640)
    # atime no older than mtime: Sha1File's read would otherwise move atime (relatime) when
    # the file was made across a second's edge, and File's stat after it would differ
    # (the folder too: FindFiles reads it before Directory's stat is taken again)
    for path in (odd, tmp_path):
        stamp = path.stat().st_mtime
        os.utime(path, (stamp + 1, stamp))
    commands = [
        StringCommand(File().command(path=str(odd))).get_raw_value(),
        StringCommand(Directory().command(path=str(tmp_path))).get_raw_value(),
        StringCommand(Sha1File().command(path=str(odd))).get_raw_value(),
        StringCommand(FindFiles().command(path=str(tmp_path))).get_raw_value(),
        StringCommand(File().command(path=str(tmp_path / "missing"))).get_raw_value(),
    ]
    sections = batched(commands)
    for index, command in enumerate(commands):
        assert sections[index] == alone(command), command


# --- 2. parse_batch refuses what is not a whole batch ---------------------------------


def whole_output() -> list[str]:
    proc = subprocess.run(
        ["sh", "-c", batch_script(["echo one", "echo two >&2; exit 1", "true"])],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=SHELL_TIMEOUT,
        check=True,
    )
    return pyinfra_lines(proc.stdout)


def test_a_whole_output_parses() -> None:
    lines = whole_output()
    assert lines == [
        f"{MARK} 0 0",
        "o one",
        f"{MARK} 1 1",
        "e two",
        f"{MARK} 2 0",
        f"{MARK} end",
    ]
    assert parse_batch(lines, 3) == {
        0: (True, [OutputLine("stdout", "one")]),
        1: (False, [OutputLine("stderr", "two")]),
        2: (True, []),
    }


BROKEN: dict[str, Callable[[list[str]], list[str]]] = {
    "empty": lambda lines: [],
    "cut before the end line": lambda lines: lines[:-1],
    "cut inside a section": lambda lines: lines[:2],
    "only the end line": lambda lines: lines[-1:],
    "duplicated index": lambda lines: [*lines[:2], *lines[:2], *lines[2:]],
    "index out of range": lambda lines: [f"{MARK} 3 0", "o x", *lines],
    "index out of range (large)": lambda lines: [f"{MARK} 99999999999999999999 0", *lines],
    "negative index": lambda lines: [f"{MARK} -1 0", *lines],
    "status not a number": lambda lines: [f"{MARK} 0 x", *lines[2:]],
    "marker with three fields": lambda lines: [f"{MARK} 0 0 0", *lines[2:]],
    "marker with one field": lambda lines: [f"{MARK} 0", *lines[2:]],
    "garbage before the first section": lambda lines: ["hello", *lines],
    "content before the first section": lambda lines: ["o early", *lines],
    "garbage inside a section": lambda lines: [*lines[:2], "stray", *lines[2:]],
    "bare prefix o": lambda lines: [*lines[:2], "o", *lines[2:]],
    "bare prefix e": lambda lines: [*lines[:2], "e", *lines[2:]],
    "empty line inside a section": lambda lines: [*lines[:2], "", *lines[2:]],
    "marker without a space": lambda lines: [lines[0].replace(" ", "", 1), *lines[1:]],
}


@pytest.mark.parametrize("how", list(BROKEN), ids=list(BROKEN))
def test_parse_batch_refuses_what_is_not_a_whole_batch(how: str) -> None:
    assert parse_batch(BROKEN[how](whole_output()), 3) == {}


# --- 3. end to end on @local -----------------------------------------------------------

OP_ARGUMENT = "s3cret-op-argument"

DEPLOY = f"""
import io
import shlex

from pyinfra import host
from pyinfra.operations import files, server

root = host.data.root
files.directory(name="Conf dir", path=f"{{root}}/conf", mode="750")
files.file(name="Conf file", path=f"{{root}}/conf/app.conf", mode="640")
motd = files.put(
    name="Motd", src=io.StringIO("hello pipeline\\n"), dest=f"{{root}}/conf/motd", mode="644"
)
server.shell(
    name="After motd",
    commands=[f"echo {OP_ARGUMENT} >> {{shlex.quote(root + '/handler.log')}}"],
    _if=motd.did_change,
)
files.directory(name="Data dir", path=f"{{root}}/data", mode="700")
files.file(name="Data file", path=f"{{root}}/data/db", mode="600")
files.file(name="Stale file", path=f"{{root}}/stale", present=False)
"""

ALL_OPS = ["Conf dir", "Conf file", "Motd", "Data dir", "Data file"]


def chmod_file(root: Path) -> None:
    (root / "conf" / "app.conf").chmod(0o666)


def change_content(root: Path) -> None:
    (root / "conf" / "motd").write_text("edited by hand\n")


def remove_file(root: Path) -> None:
    (root / "data" / "db").unlink()


def remove_directory(root: Path) -> None:
    (root / "data" / "db").unlink()
    (root / "data").rmdir()


def add_stale_file(root: Path) -> None:
    (root / "stale").write_text("left over\n")


def chmod_directory(root: Path) -> None:
    (root / "conf").chmod(0o755)


def everything(root: Path) -> None:
    for perturb in (chmod_file, change_content, remove_directory, add_stale_file):
        perturb(root)


PERTURB: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "chmod a file": (chmod_file, ["Conf file"]),
    "change a file's content": (change_content, ["Motd"]),
    "remove a file": (remove_file, ["Data file"]),
    "remove a directory": (remove_directory, ["Data dir", "Data file"]),
    "add a file that must not exist": (add_stale_file, ["Stale file"]),
    "chmod a directory": (chmod_directory, ["Conf dir"]),
    "all at once": (everything, ["Conf file", "Motd", "Data dir", "Data file", "Stale file"]),
}


@pytest.fixture
def deploy(tmp_path: Path) -> Path:
    return deploy_file(tmp_path, "files", DEPLOY)


def test_first_run_reads_directly_and_writes_a_private_wishlist(
    cache: Path, connector: Connector, inventory: Path, deploy: Path, root: Path
) -> None:
    first = connector.deploy(inventory, deploy)
    assert first.error is None
    assert (first.changes, first.executed) == (ALL_OPS, ALL_OPS)
    # no wishlist yet: nothing batched, every fact read went to the host
    assert (first.batches, first.served) == (0, 0)
    assert first.batch_commands == []
    assert first.direct > 0
    assert (root / "handler.log").read_text() == f"{OP_ARGUMENT}\n"

    [wishlist] = wishlists(cache)
    assert stat.S_IMODE(wishlist.stat().st_mode) == 0o600
    assert stat.S_IMODE((cache / "facts").stat().st_mode) == 0o700
    text = wishlist.read_text()
    doc = json.loads(text)
    assert doc["host"] == HOST
    listed = [c for commands in doc["batches"].values() for c in commands]
    assert any(str(root / "conf" / "app.conf") in c for c in listed)  # fact commands
    # only fact commands: never an operation's command (nor its arguments)
    assert OP_ARGUMENT not in text
    assert not any("handler.log" in c for c in listed)
    assert [c for c in first.commands if OP_ARGUMENT in c]  # the handler's command ran


def test_a_converged_host_costs_one_command_to_plan_and_one_to_execute(
    cache: Path,
    connector: Connector,
    inventory: Path,
    deploy: Path,
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    connector.deploy(inventory, deploy)  # converges
    # converged, the upload's checksum is read: the first run never read it (there was
    # no file yet), so the wishlist lacks it: read directly to plan and to execute, and
    # added to the wishlist
    second = connector.deploy(inventory, deploy)
    assert (second.changes, second.executed, second.error) == ([], [], None)
    assert (second.batches, second.direct) == (2, 2)
    assert len(second.commands) == 4
    before = tree(root)

    # pipeline off, converged: the facts one by one (nothing else runs)
    switch(monkeypatch, False)
    off = connector.deploy(inventory, deploy)
    assert (off.changes, off.executed, off.error) == ([], [], None)
    assert off.batch_commands == [] and (off.batches, off.served, off.direct) == (0, 0, 0)
    fact_reads = len(off.commands)
    assert fact_reads > 10  # each operation's facts, read to plan and again to execute

    switch(monkeypatch, True)
    on = connector.deploy(inventory, deploy)
    assert (on.changes, on.executed, on.error) == ([], [], None)
    assert len(on.commands) == 2, on.commands
    assert on.batch_commands == on.commands
    assert on.batches == 2
    assert (on.served, on.direct) == (fact_reads, 0)  # every read answered, none missed
    assert tree(root) == before  # nothing changed: no handler ran either


@pytest.mark.parametrize("perturb", list(PERTURB), ids=list(PERTURB))
def test_the_plan_is_the_same_with_and_without_the_pipeline(
    cache: Path,
    connector: Connector,
    inventory: Path,
    deploy: Path,
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    perturb: str,
) -> None:
    connector.deploy(inventory, deploy)  # converges, writes the wishlist
    change, expected = PERTURB[perturb]

    plans = {}
    for pipelined in (True, False):
        switch(monkeypatch, pipelined)
        plans[pipelined] = connector.deploy(inventory, deploy, execute=False)
        assert plans[pipelined].changes == [], pipelined
    change(root)
    for pipelined in (True, False):
        switch(monkeypatch, pipelined)
        plans[pipelined] = connector.deploy(inventory, deploy, execute=False)
    assert plans[True].changes == plans[False].changes == expected
    assert len(plans[True].batch_commands) == 1 and plans[True].served > 0
    assert plans[False].batch_commands == []


@pytest.mark.parametrize("perturb", list(PERTURB), ids=list(PERTURB))
def test_the_run_is_the_same_with_and_without_the_pipeline(
    cache: Path,
    connector: Connector,
    inventory: Path,
    deploy: Path,
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    perturb: str,
) -> None:
    connector.deploy(inventory, deploy)
    (root / "handler.log").unlink()
    converged = tree(root)
    change, expected = PERTURB[perturb]
    outcomes, states = {}, {}
    for pipelined in (True, False):
        switch(monkeypatch, pipelined)
        change(root)
        outcomes[pipelined] = connector.deploy(inventory, deploy)
        states[pipelined] = tree(root)
        (root / "handler.log").unlink(missing_ok=True)
    on, off = outcomes[True], outcomes[False]
    assert (on.changes, on.executed, on.error) == (off.changes, off.executed, off.error)
    assert on.executed == expected
    assert states[True] == states[False]
    # the handler ran when (and only when) what it follows changed
    assert ("handler.log" in states[True]) == ("Motd" in expected)
    states[True].pop("handler.log", None)
    assert states[True] == converged
    assert on.batches == 2 and on.served > 0


@pytest.mark.parametrize("perturb", list(PERTURB), ids=list(PERTURB))
def test_drift_between_the_plan_and_the_execution_is_seen(
    cache: Path,
    connector: Connector,
    inventory: Path,
    deploy: Path,
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    perturb: str,
) -> None:
    # the execution reads every fact again: not from the plan's batch
    connector.deploy(inventory, deploy)
    connector.deploy(inventory, deploy)
    (root / "handler.log").unlink()
    change, expected = PERTURB[perturb]
    outcomes, states = {}, {}
    for pipelined in (True, False):
        switch(monkeypatch, pipelined)
        outcomes[pipelined] = connector.deploy(inventory, deploy, between=lambda: change(root))
        states[pipelined] = tree(root)
        (root / "handler.log").unlink(missing_ok=True)
    on, off = outcomes[True], outcomes[False]
    assert (off.changes, off.executed) == ([], expected)
    assert (on.changes, on.executed, on.error) == (off.changes, off.executed, off.error)
    assert states[True] == states[False]
    assert on.batches == 2 and on.served > 0


def test_an_execution_batch_that_fails_never_falls_back_on_the_plan_s_answers(
    cache: Path,
    connector: Connector,
    inventory: Path,
    deploy: Path,
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    connector.deploy(inventory, deploy)
    connector.deploy(inventory, deploy)
    make, scripts = pipeline.batch_script, []

    def second_fails(commands: list[str]) -> str:
        scripts.append(make(commands))
        return scripts[-1] if len(scripts) == 1 else "exit 1"

    monkeypatch.setattr(pipeline, "batch_script", second_fails)
    on = connector.deploy(inventory, deploy, between=lambda: chmod_file(root))
    assert (on.changes, on.executed, on.error) == ([], ["Conf file"], None)
    assert oct((root / "conf" / "app.conf").stat().st_mode & 0o777) == "0o640"
    assert len(scripts) == 2 and on.batches == 2


# --- 4. invalidation: a later operation sees what an earlier one changed --------------

FLIP = """
from pyinfra import host
from pyinfra.operations import files

path = host.data.root + "/flip"
files.file(name="Tighten", path=path, mode="600")
files.file(name="Loosen", path=path, mode="644")
"""

UPLOAD = """
import io

from pyinfra import host
from pyinfra.operations import files

path = host.data.root + "/uploaded"
files.put(name="Upload", src=io.StringIO("uploaded\\n"), dest=path)
files.file(name="Remove the upload again", path=path, present=False)
"""

CALLBACK = """
import os

from pyinfra import host
from pyinfra.operations import files, python

path = host.data.root + "/called"

def loosen():
    os.chmod(path, 0o666)  # @local: the controller is the host

files.file(name="Check it is there", path=path)  # its fact read starts the stage's batch
python.call(name="Loosen from Python", function=loosen)
files.file(name="Tighten again", path=path, mode="600")
"""


def flip_state(root: Path) -> None:
    (root / "flip").write_text("")
    (root / "flip").chmod(0o644)


def upload_state(root: Path) -> None:
    (root / "uploaded").unlink(missing_ok=True)


def callback_state(root: Path) -> None:
    (root / "called").write_text("")
    (root / "called").chmod(0o600)


@dataclass(frozen=True)
class Invalidation:
    deploy: str
    reset: Callable[[Path], None]  # the state before each run
    plan: list[str]
    executed: list[str]
    path: str  # the file both operations manage, under root
    mode: str | None  # its mode afterwards (None: absent)


INVALIDATION = {
    "an operation's command": Invalidation(
        FLIP, flip_state, ["Tighten"], ["Tighten", "Loosen"], "flip", "0o644"
    ),
    "an upload": Invalidation(
        UPLOAD, upload_state, ["Upload"], ["Upload", "Remove the upload again"], "uploaded", None
    ),
    "a Python callback": Invalidation(
        CALLBACK,
        callback_state,
        ["Loosen from Python"],
        ["Loosen from Python", "Tighten again"],
        "called",
        "0o600",
    ),
}


@pytest.mark.parametrize("case", list(INVALIDATION), ids=list(INVALIDATION))
def test_a_later_operation_sees_what_an_earlier_one_changed(
    cache: Path,
    connector: Connector,
    inventory: Path,
    tmp_path: Path,
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
) -> None:
    want = INVALIDATION[case]
    deploy = deploy_file(tmp_path, "invalidation", want.deploy)
    want.reset(root)
    connector.deploy(inventory, deploy)  # writes the wishlist
    assert wishlists(cache)
    outcomes, states = {}, {}
    for pipelined in (True, False):
        switch(monkeypatch, pipelined)
        want.reset(root)
        outcomes[pipelined] = connector.deploy(inventory, deploy)
        states[pipelined] = tree(root)
    on, off = outcomes[True], outcomes[False]
    assert (off.changes, off.executed) == (want.plan, want.executed)  # pyinfra's own
    assert (on.changes, on.executed, on.error) == (off.changes, off.executed, off.error)
    assert states[True] == states[False]
    after = states[True].get(want.path)
    assert (after[1] if after else None) == want.mode
    # the pipeline was at work: both stages started with a batch
    assert on.batches == 2 and on.served > 0


# --- 5. fallback: a batch that cannot work answers nothing ----------------------------

_REAL_BATCH_SCRIPT = batch_script

FAILING: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "the batch exits 1": lambda mp: mp.setattr(pipeline, "batch_script", lambda commands: "exit 1"),
    "output cut before the end line": lambda mp: mp.setattr(
        pipeline,
        "batch_script",
        lambda commands: _REAL_BATCH_SCRIPT(commands).rsplit("\n", 1)[0],
    ),
    "output cut inside a section": lambda mp: mp.setattr(
        pipeline,
        "batch_script",
        lambda commands: "{\n" + _REAL_BATCH_SCRIPT(commands) + "\n} | head -n 3",
    ),
    "sections duplicated": lambda mp: mp.setattr(
        pipeline,
        "batch_script",
        lambda commands: "{\n" + _REAL_BATCH_SCRIPT(commands) + "\n} | sed p",
    ),
    "a whole output, but exit status 1": lambda mp: mp.setattr(
        pipeline,
        "batch_script",
        lambda commands: _REAL_BATCH_SCRIPT(commands) + "\nexit 1",
    ),
    "mktemp refused": lambda mp: mp.setenv("TMPDIR", "/nonexistent/gpunode-test"),
}


@pytest.mark.parametrize("failure", list(FAILING), ids=list(FAILING))
def test_a_batch_that_fails_leaves_the_run_as_without_the_pipeline(
    cache: Path,
    connector: Connector,
    inventory: Path,
    deploy: Path,
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
) -> None:
    connector.deploy(inventory, deploy)  # converges, writes the wishlist
    connector.deploy(inventory, deploy)  # adds what the first run could not read
    (root / "handler.log").unlink()
    FAILING[failure](monkeypatch)
    scripts: list[str] = []  # the batches the pipeline made
    make = pipeline.batch_script

    def recorded(commands: list[str]) -> str:
        scripts.append(make(commands))
        return scripts[-1]

    monkeypatch.setattr(pipeline, "batch_script", recorded)
    outcomes, states = {}, {}
    for pipelined in (True, False):
        switch(monkeypatch, pipelined)
        everything(root)
        outcomes[pipelined] = connector.deploy(inventory, deploy)
        states[pipelined] = tree(root)
        (root / "handler.log").unlink()
    on, off = outcomes[True], outcomes[False]
    assert off.changes == PERTURB["all at once"][1]
    assert (on.changes, on.executed, on.error) == (off.changes, off.executed, off.error)
    assert states[True] == states[False]
    # one batch tried per stage, nothing answered from it: every read went to the host
    assert len(scripts) == 2 and (on.batches, on.served) == (2, 0)
    ran = [c for c in on.commands if c not in scripts]
    assert len(ran) == len(on.commands) - 2
    assert [unique(c) for c in ran] == [unique(c) for c in off.commands]


# --- 6. masked parts are never batched nor written down -------------------------------

MASKED = """
from pyinfra import host
from pyinfra.api import FactBase, StringCommand
from pyinfra.api.command import MaskString
from pyinfra.api.hiddenvalue import HiddenValue
from pyinfra.operations import files


class Secretive(FactBase):
    def command(self):
        return StringCommand("echo", {mask}("s3cret-fact-arg"))


class Plain(FactBase):
    def command(self):
        return "echo plain-fact"


if host.get_fact(Secretive) == "s3cret-fact-arg":
    files.file(name="Secret read", path=host.data.root + "/secret-read")
if host.get_fact(Plain) == "plain-fact":
    files.file(name="Plain read", path=host.data.root + "/plain-read")
"""


@pytest.mark.parametrize("mask", ["MaskString", "HiddenValue"])
def test_a_fact_with_a_masked_part_is_never_batched_nor_written(
    cache: Path, connector: Connector, inventory: Path, tmp_path: Path, mask: str
) -> None:
    deploy = deploy_file(tmp_path, "masked", MASKED.replace("{mask}", mask))
    first = connector.deploy(inventory, deploy)
    assert first.executed == ["Secret read", "Plain read"]
    second = connector.deploy(inventory, deploy)
    assert (second.changes, second.executed, second.error) == ([], [], None)

    [wishlist] = wishlists(cache)
    text = wishlist.read_bytes()
    assert b"echo plain-fact" in text  # facts are written down, this one is not:
    assert b"s3cret" not in text
    assert second.served > 0 and second.batch_commands
    assert not [c for c in second.batch_commands if "s3cret" in c]
    alone_reads = [c for c in second.commands if "s3cret-fact-arg" in c]
    assert len(alone_reads) == 1  # read by itself (deploy-level code runs only to plan)
    assert not any("s3cret" in m for m in pipeline.stats().missed.get(HOST, []))
    assert "echo *MASKED*" in pipeline.stats().missed.get(HOST, [])


PROBE = """
from pyinfra import host
from pyinfra.api import FactBase
from pyinfra.operations import files


class Probe(FactBase):
    def command(self):
        return {command!r}


plain = host.get_fact(Probe, _ignore_errors=True)
given = host.get_fact(Probe, {argument})
files.file(name=f"plain={{plain!r}} given={{given!r}}", path=host.data.root + "/probe")
"""


@dataclass(frozen=True)
class Argument:
    """A fact read with a connector argument, and without it."""

    command: str
    argument: str  # as written in the deploy
    plain: str | None  # the fact's value read without it
    given: str  # and with it
    batched: bool  # the read with it may be answered from a batch


ARGUMENTS = {
    # a batch runs each command with stdin from /dev/null: never one fed on stdin
    "_stdin": Argument("cat", '_stdin="fed on stdin"', None, "fed on stdin", False),
    # pipeline.py's rule: no _env, no other shell
    "_env": Argument(
        'echo "[$GPUNODE_X]"', '_env={"GPUNODE_X": "from env"}', "[]", "[from env]", False
    ),
    "_shell_executable": Argument(
        'echo "[${BASH_VERSION:+bash}]"', '_shell_executable="bash"', "[]", "[bash]", False
    ),
    # batched apart from the plain reads, with the argument
    "_chdir": Argument("pwd", "_chdir=host.data.root + '/sub'", "CWD", "ROOT/sub", True),
    "_success_exit_codes": Argument(
        "echo one; exit 1", "_success_exit_codes=[0, 1]", None, "one", True
    ),
}


@pytest.mark.parametrize("argument", list(ARGUMENTS), ids=list(ARGUMENTS))
def test_a_fact_read_with_connector_arguments_reads_the_same(
    cache: Path,
    connector: Connector,
    inventory: Path,
    tmp_path: Path,
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    argument: str,
) -> None:
    case = ARGUMENTS[argument]
    (root / "sub").mkdir()
    body = PROBE.format(command=case.command, argument=case.argument)
    deploy = deploy_file(tmp_path, "probe", body)
    want = "plain={!r} given={!r}".format(
        os.getcwd() if case.plain == "CWD" else case.plain, case.given.replace("ROOT", str(root))
    )
    outcomes = {}
    for pipelined in (True, True, False):  # the second: with the wishlist the first wrote
        switch(monkeypatch, pipelined)
        outcomes[pipelined] = connector.deploy(inventory, deploy, execute=False)
    on, off = outcomes[True], outcomes[False]
    assert off.changes == [want]  # pyinfra's own reading
    assert on.changes == off.changes
    assert on.batches >= 1 and on.served >= 1  # the plain read, at least
    assert on.direct == (0 if case.batched else 1)


# --- what an operation only reads keeps the snapshot ----------------------------------

PRIVATE = """
import grp
import os
import pwd

from pyinfra import host
from pyinfra.operations import files

from gpunode.operations.files import MaskedBytes, private_file

root = host.data.root
private_file(
    name="Key",
    path=root + "/key",
    content=MaskedBytes("test key", b"s3cret-key-bytes\\n"),
    user=pwd.getpwuid(os.getuid()).pw_name,
    group=grp.getgrgid(os.getgid()).gr_name,
    mode="0600",
)
files.file(name="After the key", path=root + "/after", mode="640")
"""


def test_commands_an_operation_only_reads_with_keep_the_snapshot(
    cache: Path,
    connector: Connector,
    inventory: Path,
    tmp_path: Path,
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # private_file compares the file's content through a staging directory, inside
    # pipeline.reading(): those commands change nothing a fact saw
    deploy = deploy_file(tmp_path, "private", PRIVATE)
    first = connector.deploy(inventory, deploy)
    assert first.executed == ["Key", "After the key"]
    assert (root / "key").read_bytes() == b"s3cret-key-bytes\n"
    outcomes = {}
    for pipelined in (True, False):
        switch(monkeypatch, pipelined)
        outcomes[pipelined] = connector.deploy(inventory, deploy)
    on, off = outcomes[True], outcomes[False]
    assert (on.changes, on.executed, on.error) == (off.changes, off.executed, off.error)
    assert (on.changes, on.executed, on.error) == ([], [], None)
    staging = [c for c in on.commands if "gpunode-secret-" in c]
    assert staging  # the content was compared, in each stage
    assert len(on.commands) == 2 + len(staging)
    assert (on.batches, on.direct) == (2, 0)  # the fact after the key was still served
    [wishlist] = wishlists(cache)
    assert "gpunode-secret-" not in wishlist.read_text()
    assert b"s3cret-key-bytes" not in wishlist.read_bytes()
    assert not [c for c in on.commands if "s3cret-key-bytes" in c]


# --- a wishlist is only a hint: a bad one costs speed, never a wrong answer -----------


def _other_host(doc: dict[str, Any]) -> object:
    return {**doc, "host": "gpu-01"}


def _not_strings(doc: dict[str, Any]) -> object:
    return {**doc, "batches": {key: [1, None, {}] for key in doc["batches"]}}


def _not_lists(doc: dict[str, Any]) -> object:
    return {**doc, "batches": {key: "\n".join(c) for key, c in doc["batches"].items()}}


BAD_WISHLISTS: dict[str, Callable[[dict[str, Any]], object]] = {
    "another host's": _other_host,
    "commands not strings": _not_strings,
    "commands not a list": _not_lists,
    "batches not a dict": lambda doc: {**doc, "batches": list(doc["batches"])},
    "a list": lambda doc: [doc],
    "null": lambda doc: None,
    "not JSON": lambda doc: b"{",
    "binary": lambda doc: b"\xff\xfe\x00",
    "empty": lambda doc: b"",
    "a directory": lambda doc: Path,
}


@pytest.mark.parametrize("bad", list(BAD_WISHLISTS), ids=list(BAD_WISHLISTS))
def test_a_bad_wishlist_is_ignored(
    cache: Path,
    connector: Connector,
    inventory: Path,
    deploy: Path,
    root: Path,
    bad: str,
) -> None:
    connector.deploy(inventory, deploy)
    [wishlist] = wishlists(cache)
    doc = json.loads(wishlist.read_text())
    spoiled = BAD_WISHLISTS[bad](doc)
    wishlist.unlink()
    if spoiled is Path:
        wishlist.mkdir()
    else:
        wishlist.write_bytes(
            spoiled if isinstance(spoiled, bytes) else json.dumps(spoiled).encode()
        )
    chmod_file(root)
    again = connector.deploy(inventory, deploy)
    assert (again.changes, again.executed, again.error) == (["Conf file"], ["Conf file"], None)
    assert (again.batches, again.served) == (0, 0) and again.batch_commands == []
    assert not [p for p in (cache / "facts").iterdir() if p.name.startswith(".")]
    if spoiled is not Path:  # rewritten from this run's reads
        assert json.loads(wishlist.read_text())["host"] == HOST
        assert connector.deploy(inventory, deploy).served > 0


# --- 7. the switch ------------------------------------------------------------------


def test_switched_off_no_batch_and_no_wishlist(
    cache: Path,
    connector: Connector,
    inventory: Path,
    deploy: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    switch(monkeypatch, False)
    for _ in range(2):
        off = connector.deploy(inventory, deploy)
        assert off.batch_commands == []
        assert (off.batches, off.served, off.direct) == (0, 0, 0)
        assert not (cache / "facts").exists()

    # a wishlist left by a run with the pipeline on is neither used nor rewritten
    switch(monkeypatch, True)
    connector.deploy(inventory, deploy)
    [wishlist] = wishlists(cache)
    before = (wishlist.read_bytes(), wishlist.stat().st_mtime_ns)
    switch(monkeypatch, False)
    off = connector.deploy(inventory, deploy)
    assert off.batch_commands == [] and off.commands
    assert (wishlist.read_bytes(), wishlist.stat().st_mtime_ns) == before
    assert wishlists(cache) == [wishlist]


# --- 8. the pyinfra internals the pipeline relies on ----------------------------------


def test_pyinfra_internals_the_pipeline_wraps_are_where_it_expects_them(
    cache: Path, connector: Connector, inventory: Path, deploy: Path
) -> None:
    assert callable(getattr(pyinfra_facts, "_get_fact", None)), MOVED
    # get_fact must call _get_fact through the module global (the name install() replaces)
    assert "_get_fact" in pyinfra_facts.get_fact.__code__.co_names, MOVED
    assert hasattr(StateStage, "Prepare") and hasattr(StateStage, "Execute"), MOVED
    assert StateStage.Prepare < StateStage.Execute, MOVED
    assert "current_stage" in State.__annotations__ or hasattr(State, "current_stage"), MOVED
    assert callable(getattr(BaseStateCallback, "host_disconnect", None)), MOVED
    # the commands operations run go through the Host methods pipeline wraps
    assert "run_shell_command" in StringCommand.execute.__code__.co_names, MOVED
    assert "put_file" in FileUploadCommand.execute.__code__.co_names, MOVED
    assert CommandOutput([OutputLine("stdout", "x")]).stdout_lines == ["x"], MOVED

    pipeline.install()
    # the wrapper reads the fact's class, args and kwargs by position
    original = inspect.getclosurevars(pyinfra_facts._get_fact).nonlocals.get("original")
    assert original is not None, MOVED
    names = list(inspect.signature(original).parameters)[:5]
    assert names == ["state", "host", "cls", "args", "kwargs"], MOVED
    assert pyinfra_facts._get_fact.__qualname__.startswith("_wrap_get_fact."), MOVED
    assert Host.run_shell_command.__qualname__.startswith("_wrap_run_shell_command."), MOVED
    assert Host.put_file.__qualname__.startswith("_wrap_put_file."), MOVED

    # and a fact read really goes through the wrappers: counted, then batched
    first = connector.deploy(inventory, deploy, execute=False)
    assert first.direct > 0, MOVED
    again = connector.deploy(inventory, deploy, execute=False)
    assert (again.batches, again.direct) == (1, 0), MOVED
    assert again.served == first.direct, MOVED
    run_state = State()
    assert int(run_state.current_stage) == StateStage.Setup, MOVED


def test_install_is_idempotent() -> None:
    pipeline.install()
    wrapped = (pyinfra_facts._get_fact, Host.run_shell_command, Host.put_file)
    pipeline.install()
    assert (pyinfra_facts._get_fact, Host.run_shell_command, Host.put_file) == wrapped


# --- 9. a wishlist someone else could have written is never used nor written into -------

OTHER_UID = 65534  # nobody / nogroup


def _give_away(path: Path) -> None:
    need_root("giving the wishlist to another user")
    os.lchown(path, OTHER_UID, OTHER_UID)


def _symlink_to_a_private_copy(path: Path) -> None:
    # the copy itself is private and valid: only the link makes it someone else's choice
    copy = path.parent.parent / "elsewhere" / path.name
    copy.parent.mkdir(mode=0o700)
    copy.write_bytes(path.read_bytes())
    copy.chmod(0o600)
    path.unlink()
    path.symlink_to(copy)


def _folder_symlink(folder: Path) -> None:
    real = folder.with_name("facts-real")
    folder.rename(real)
    folder.symlink_to(real, target_is_directory=True)


UNSAFE_WISHLISTS: dict[str, Callable[[Path], None]] = {
    "group-writable": lambda w: w.chmod(0o620),
    "other-writable": lambda w: w.chmod(0o602),
    "another user's": _give_away,
    "a symlink": _symlink_to_a_private_copy,
}

UNSAFE_FOLDERS: dict[str, Callable[[Path], None]] = {
    "group-writable": lambda f: f.chmod(0o770),
    "other-writable": lambda f: f.chmod(0o703),
    "another user's": _give_away,
    "a symlink": _folder_symlink,
}


def listing(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file in a folder: content, mode, mtime (what a write would change)."""
    return {
        p.name: (p.read_bytes(), p.lstat().st_mode, p.lstat().st_mtime_ns)
        for p in sorted(folder.iterdir())
    }


@pytest.mark.parametrize("unsafe", list(UNSAFE_WISHLISTS), ids=list(UNSAFE_WISHLISTS))
def test_a_wishlist_others_could_have_written_is_ignored_then_replaced(
    cache: Path,
    connector: Connector,
    inventory: Path,
    deploy: Path,
    root: Path,
    unsafe: str,
) -> None:
    connector.deploy(inventory, deploy)
    [wishlist] = wishlists(cache)
    target = None
    UNSAFE_WISHLISTS[unsafe](wishlist)
    if wishlist.is_symlink():
        target = wishlist.resolve()
        kept = target.read_bytes()
    chmod_file(root)
    again = connector.deploy(inventory, deploy)
    assert (again.changes, again.executed, again.error) == (["Conf file"], ["Conf file"], None)
    # not a hint to trust: every fact read one by one, no batch
    assert (again.batches, again.served) == (0, 0) and again.batch_commands == []
    # the folder is private: the save replaced it with this run's own, private file
    info = wishlist.lstat()
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.geteuid()
    assert json.loads(wishlist.read_text())["host"] == HOST
    assert not [p for p in (cache / "facts").iterdir() if p.name.startswith(".")]
    if target is not None:  # written beside the link's target, never through it
        assert target.read_bytes() == kept
    assert connector.deploy(inventory, deploy).served > 0  # trusted again


@pytest.mark.parametrize("unsafe", list(UNSAFE_FOLDERS), ids=list(UNSAFE_FOLDERS))
def test_a_wishlist_folder_others_could_write_to_is_neither_read_nor_written(
    cache: Path,
    connector: Connector,
    inventory: Path,
    deploy: Path,
    root: Path,
    unsafe: str,
) -> None:
    connector.deploy(inventory, deploy)
    folder = cache / "facts"
    UNSAFE_FOLDERS[unsafe](folder)
    real = folder.resolve()
    before = listing(real)
    assert len(before) == 1
    for _ in range(2):
        chmod_file(root)
        again = connector.deploy(inventory, deploy)
        assert (again.changes, again.executed, again.error) == (
            ["Conf file"],
            ["Conf file"],
            None,
        )
        assert (again.batches, again.served) == (0, 0) and again.batch_commands == []
        assert listing(real) == before  # nothing written into it, not even a temp file


def test_a_missing_wishlist_folder_is_made_private(
    cache: Path, connector: Connector, inventory: Path, deploy: Path
) -> None:
    old = os.umask(0o000)  # a permissive umask must not make it writable by others
    try:
        connector.deploy(inventory, deploy)
    finally:
        os.umask(old)
    [wishlist] = wishlists(cache)
    assert stat.S_IMODE((cache / "facts").stat().st_mode) == 0o700
    assert stat.S_IMODE(wishlist.stat().st_mode) == 0o600


# --- 10. fact_reads: what the seal is built from ----------------------------------------

FACT_READS = """
from pyinfra import host
from pyinfra.api import FactBase, StringCommand
from pyinfra.api.command import MaskString
from pyinfra.facts.files import Directory, File


class Secretive(FactBase):
    def command(self):
        return StringCommand("echo", MaskString("s3cret-fact-arg"))


class Plain(FactBase):
    def command(self, word):
        return "echo " + word


root = host.data.root
host.get_fact(File, path=root + "/a")
host.get_fact(Directory, path=root)
host.get_fact(File, path=root + "/a")  # again: listed once
host.get_fact(Secretive)
host.get_fact(File, root + "/b")  # by position: the same argument name
host.get_fact(Plain, word="hello")
host.get_fact(Plain, "hello")
"""


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipeline on", "pipeline off"])
def test_fact_reads_lists_each_read_once_in_order(
    cache: Path,
    inventory: Path,
    tmp_path: Path,
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    pipelined: bool,
) -> None:
    from pyinfra.facts.files import Directory, File

    switch(monkeypatch, pipelined)
    deploy = deploy_file(tmp_path, "reads", FACT_READS)
    with run.prepare(run.load_inventory(inventory), deploy, detect_changes=False) as planned:
        assert planned.errors == {}
        reads = pipeline.fact_reads(planned.host(HOST))

    def command(fact: type, **kwargs: Any) -> str:
        return StringCommand(fact().command(**kwargs)).get_masked_value()

    a, b = str(root / "a"), str(root / "b")
    assert [(r.fact.__name__, r.arguments, r.batchable) for r in reads] == [
        ("File", (("path", a),), True),
        ("Directory", (("path", str(root)),), True),
        ("Secretive", (), False),
        ("File", (("path", b),), True),
        ("Plain", (("word", "hello"),), True),
    ]
    assert reads[0].fact is File and reads[1].fact is Directory
    assert reads[0].argument("path") == a and reads[0].argument("other") is None
    assert [r.command for r in reads] == [
        command(File, path=a),
        command(Directory, path=str(root)),
        "echo *MASKED*",
        command(File, path=b),
        "echo hello",
    ]
    assert not [r for r in reads if "s3cret" in repr(r)]
