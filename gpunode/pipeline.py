"""Fact pipelining: the facts a deploy reads on a host, gathered in one command.

pyinfra runs one remote command per fact, one after another, and reads every fact twice
in a normal run: once to plan (detect changes), once more when each operation executes.
A converged GPU node managed by gpunode costs about 160 such commands, each a round trip.

With pipelining, each host keeps a *wishlist*: the fact commands the last run on it read
(kept on the controller, see :func:`cache_dir`). At the first fact read of a stage
(planning, executing) the whole wishlist runs as one command, every fact in its own
subshell, its stdout, stderr and exit status kept apart; each later read of a listed
fact is answered from that output. Nothing else changes: the command is pyinfra's own
fact command, byte for byte, and pyinfra's own code turns its output into the fact
(``process``, defaults, missing commands, sudo's unknown-user rule). Operations decide
exactly as before.

A snapshot is only as fresh as the host: it is dropped as soon as anything else runs on
the host (an operation's command, an upload), and every read after that goes to the host
again, one fact at a time, as pyinfra does. A converged host runs nothing else, so it
costs one command to plan and one to execute, plus any fact the wishlist did not have.
A batch that fails as a whole (mktemp refused, sudo asking for a password) or lacks a
fact's section answers nothing: those facts are read one by one.

Only plain facts are pipelined: no ``_env``, no pty, no other shell, no masked (secret)
part in the command; the others run as before. ``GPUNODE_FACT_PIPELINE=0`` turns it off.

pyinfra has no public hook for this: :func:`install` wraps ``pyinfra.api.facts._get_fact``
(to know a command is a fact's) and ``Host.run_shell_command`` / ``Host.put_file``.
tests/unit/test_pipeline.py fails when those move; pyproject pins pyinfra's range.

.. code:: python

    from gpunode import pipeline
    pipeline.install()  # deploys/*.py do this first
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shlex
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyinfra.api.facts as pyinfra_facts
from pyinfra.api.command import FunctionCommand, RsyncCommand, StringCommand
from pyinfra.api.host import Host
from pyinfra.api.state import BaseStateCallback, State
from pyinfra.connectors.util import CommandOutput, OutputLine

__all__ = [
    "FactRead",
    "Stats",
    "cache_dir",
    "direct",
    "fact_reads",
    "install",
    "reading",
    "stats",
]

ENV_SWITCH = "GPUNODE_FACT_PIPELINE"
ENV_CACHE = "GPUNODE_CACHE_DIR"
MARK = "@@gpunode-fact"
# one batch stays well under Linux's limit for one argument (sudo passes it to sh -c)
MAX_BATCH_BYTES = 96 * 1024
# executor arguments that never change what a command prints, and must never be stored
ELSEWHERE_KEYS = ("_sudo_user", "_su_user", "_doas_user", "_chdir")
_IGNORED_KEYS = ("print_output", "print_input", "_sudo_password", "_su_password", "_timeout")


@dataclass
class Stats:
    """What pipelining did, per host name (for benchmarks and tests)."""

    batches: dict[str, int] = field(default_factory=dict)  # batch commands run
    served: dict[str, int] = field(default_factory=dict)  # fact reads answered from one
    direct: dict[str, int] = field(default_factory=dict)  # fact reads that went to the host
    # the first words of each such read (masked), to see what a wishlist lacks
    missed: dict[str, list[str]] = field(default_factory=dict)

    def bump(self, table: dict[str, int], host: str) -> None:
        table[host] = table.get(host, 0) + 1

    def miss(self, host: str, command: Any) -> None:
        self.bump(self.direct, host)
        text = command.get_masked_value() if isinstance(command, StringCommand) else str(command)
        self.missed.setdefault(host, []).append(text[:120])


@dataclass(frozen=True)
class FactRead:
    """One fact read on a host: its class, its arguments (by name), the command pyinfra
    ran for it and whether that command could be batched (plain, nothing masked)."""

    fact: type
    arguments: tuple[tuple[str, Any], ...]
    command: str
    batchable: bool
    # read as another user or in another directory: the seal (run as the connection's
    # user, in its home) could not read it the same way
    elsewhere: bool = False

    def argument(self, name: str) -> Any:
        return dict(self.arguments).get(name)


@dataclass
class _HostPipe:
    """One host's wishlist (command text per executor-argument key) and current snapshot."""

    wanted: dict[str, dict[str, None]]  # key -> ordered commands, from the last run
    seen: dict[str, dict[str, None]] = field(default_factory=dict)  # this run's reads
    generation: int = 0  # bumped by anything but a fact read
    snapshot_at: tuple[int, int] | None = None  # (stage, generation) of ``snapshot``
    snapshot: dict[tuple[str, str], tuple[bool, list[OutputLine]]] = field(default_factory=dict)
    batched: set[tuple[int, str]] = field(default_factory=set)  # (stage, key) batches run
    in_fact: bool = False
    current: tuple[type, tuple[tuple[str, Any], ...]] | None = None  # the fact being read
    reads: dict[FactRead, None] = field(default_factory=dict)  # this run's, in order
    reading: bool = False  # an operation reads state with commands of its own
    direct: bool = False  # fact reads go to the host one by one, unrecorded


_lock = threading.Lock()
_stats = Stats()
_installed = False


def enabled(state: State | None = None) -> bool:
    """On unless ``GPUNODE_FACT_PIPELINE=0``, or ``state`` opted out (a run that reads one
    fact per host has nothing to batch: ``state._gpunode_pipeline_off = True``)."""
    if state is not None and getattr(state, "_gpunode_pipeline_off", False):
        return False
    return os.environ.get(ENV_SWITCH, "1") != "0"


def stats() -> Stats:
    return _stats


def fact_reads(host: Host) -> list[FactRead]:
    """The facts read on ``host`` in this run so far, first read first (gpunode/seal.py
    seals what they saw)."""
    return list(_pipe(host).reads)


def cache_dir() -> Path:
    """Where wishlists are kept: ``$GPUNODE_CACHE_DIR``, else ``$XDG_CACHE_HOME/gpunode``,
    else ``~/.cache/gpunode``; ``facts/`` below it, 0700, one 0600 JSON file per host."""
    if os.environ.get(ENV_CACHE):
        base = Path(os.environ[ENV_CACHE])
    elif os.environ.get("XDG_CACHE_HOME"):
        base = Path(os.environ["XDG_CACHE_HOME"]) / "gpunode"
    else:
        base = Path.home() / ".cache" / "gpunode"
    return base / "facts"


def _wishlist_path(host_name: str) -> Path:
    return cache_dir() / (hashlib.sha256(host_name.encode()).hexdigest()[:32] + ".json")


def _private(path: Path) -> bool:
    """Owned by whoever runs this and writable by no one else: a wishlist is a list of
    commands run on the fleet, so nobody else may have written it."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022 and not stat.S_ISLNK(st.st_mode)


def _load_wishlist(host_name: str) -> dict[str, dict[str, None]]:
    path = _wishlist_path(host_name)
    if not (_private(path.parent) and _private(path)):
        return {}  # missing, or someone else could have written it: read facts one by one
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("host") != host_name:
        return {}
    batches = data.get("batches")
    if not isinstance(batches, dict):
        return {}
    return {
        str(key): dict.fromkeys(c for c in commands if isinstance(c, str))
        for key, commands in batches.items()
        if isinstance(commands, list)
    }


def _save_wishlist(host_name: str, seen: dict[str, dict[str, None]]) -> None:
    """Atomically, 0600 in a 0700 directory; a failure only costs speed next time."""
    if not seen:
        return
    folder = cache_dir()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _private(folder):
            return  # not ours alone: it would not be read back either
        doc = {"host": host_name, "batches": {k: list(v) for k, v in seen.items()}}
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".wishlist-")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(doc, out)
            os.replace(tmp, _wishlist_path(host_name))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass


def _pipe(host: Host) -> _HostPipe:
    pipe: _HostPipe | None = getattr(host, "_gpunode_pipe", None)
    if pipe is None:
        pipe = _HostPipe(wanted=_load_wishlist(host.name) if enabled() else {})
        host._gpunode_pipe = pipe  # type: ignore[attr-defined]
    return pipe


def _batchable(command: Any, kwargs: dict[str, Any]) -> str | None:
    """The executor-argument key of a fact command that may run in a batch, else None."""
    if not isinstance(command, StringCommand | str):
        return None
    if isinstance(command, StringCommand) and command.get_masked_value() != command.get_raw_value():
        return None  # a masked (secret) part: never stored, never batched
    if (
        kwargs.get("_env")
        or kwargs.get("_stdin")  # a batch feeds every fact /dev/null
        or kwargs.get("_get_pty")
        or kwargs.get("_shell_executable") not in (None, "sh")
    ):
        return None
    # callables (``_retry_until``) have no stable repr and change no command's output
    kept = {k: v for k, v in kwargs.items() if k not in _IGNORED_KEYS and not callable(v)}
    return hashlib.sha256(repr(sorted(kept.items())).encode()).hexdigest()[:16]


def _text(command: Any) -> str:
    return command.get_raw_value() if isinstance(command, StringCommand) else str(command)


def batch_script(commands: Iterable[str]) -> str:
    """One shell script running each command in its own subshell (stdin from /dev/null),
    its stdout and stderr captured apart and printed prefixed ``o ``/``e `` after a
    ``@@gpunode-fact <index> <exit status>`` line; ``@@gpunode-fact end`` closes it.

    Each command reaches its subshell quoted, through ``eval``: a trailing backslash, an
    unfinished heredoc or a syntax error stays inside it. The script's own variable and
    function are unset there, so a command sees the shell it would see alone."""
    parts = [
        "__gpunode_d=$(mktemp -d) || exit 97; trap 'rm -rf \"$__gpunode_d\"' EXIT",
        '__gpunode_p() { awk -v p="$1" \'{print p $0}\' "$2"; }',
    ]
    for index, command in enumerate(commands):
        parts.append(
            f"(unset -f __gpunode_p; unset __gpunode_d; eval {shlex.quote(command)}\n) "
            '</dev/null >"$__gpunode_d/o" 2>"$__gpunode_d/e"; '
            f'echo "{MARK} {index} $?"; '
            '__gpunode_p "o " "$__gpunode_d/o"; __gpunode_p "e " "$__gpunode_d/e"'
        )
    parts.append(f'echo "{MARK} end"')
    return "\n".join(parts)


def parse_batch(
    lines: Iterable[str], count: int, success_codes: Iterable[int] = (0,)
) -> dict[int, tuple[bool, list[OutputLine]]]:
    """The sections of a batch's stdout, by index: (status, output lines). A batch that did
    not reach its end line answers nothing (a section may be cut short)."""
    ok = set(success_codes)
    out: dict[int, tuple[bool, list[OutputLine]]] = {}
    current: list[OutputLine] | None = None
    finished = False
    for line in lines:
        if line.startswith(MARK + " "):
            rest = line[len(MARK) + 1 :].split()
            if rest == ["end"]:
                finished = True
                break
            if len(rest) != 2 or not rest[0].isdigit() or not rest[1].isdigit():
                return {}
            index = int(rest[0])
            if index >= count or index in out:
                return {}
            current = []
            out[index] = (int(rest[1]) in ok, current)
        elif current is not None and line[:2] in ("o ", "e "):
            current.append(OutputLine("stdout" if line[0] == "o" else "stderr", line[2:]))
        elif current is not None and line in ("o", "e"):  # awk never prints these; be strict
            return {}
        else:
            return {}
    return out if finished else {}


def _chunks(commands: list[str]) -> Iterable[list[str]]:
    chunk: list[str] = []
    size = 0
    for command in commands:
        if chunk and size + len(command) > MAX_BATCH_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(command)
        size += len(command) + 64
    if chunk:
        yield chunk


def _run_batch(
    original: Callable[..., Any], host: Host, key: str, kwargs: dict[str, Any], pipe: _HostPipe
) -> None:
    commands = list(pipe.wanted.get(key, {}))
    success = kwargs.get("_success_exit_codes") or (0,)
    for chunk in _chunks(commands):
        pipe.in_fact = True
        try:
            status, output = original(
                host,
                StringCommand(batch_script(chunk)),
                print_output=False,
                print_input=False,
                **{k: v for k, v in kwargs.items() if k not in ("print_output", "print_input")},
            )
        except Exception:  # the one-by-one reads report the connection's error themselves
            return
        finally:
            pipe.in_fact = False
        _stats.bump(_stats.batches, host.name)
        if not status:
            continue
        for index, section in parse_batch(output.stdout_lines, len(chunk), success).items():
            pipe.snapshot[(key, chunk[index])] = section


def _stage_key(host: Host, pipe: _HostPipe) -> tuple[int, int]:
    state = host.state
    stage = int(state.current_stage) if state is not None else 0
    return (stage, pipe.generation)


def _wrap_run_shell_command(original: Callable[..., Any]) -> Callable[..., Any]:
    def run_shell_command(self: Host, *args: Any, **kwargs: Any) -> Any:
        pipe = _pipe(self)
        if pipe.reading or (pipe.direct and pipe.in_fact):
            # changes nothing the snapshot saw; not a fact to batch (or to wish for) either
            return original(self, *args, **kwargs)
        if not (pipe.in_fact and args):
            pipe.generation += 1  # an operation's command: what the snapshot saw may change
            return original(self, *args, **kwargs)
        command = args[0]
        key = _batchable(command, kwargs)
        if pipe.current is not None:
            fact, arguments = pipe.current
            masked = command.get_masked_value() if isinstance(command, StringCommand) else None
            elsewhere = any(kwargs.get(k) for k in ELSEWHERE_KEYS)
            read = FactRead(fact, arguments, masked or str(command), key is not None, elsewhere)
            pipe.reads[read] = None
        if not enabled(self.state):
            return original(self, *args, **kwargs)
        if key is None:
            _stats.miss(self.name, command)
            return original(self, *args, **kwargs)
        text = _text(command)
        pipe.seen.setdefault(key, {})[text] = None
        at = _stage_key(self, pipe)
        if pipe.snapshot_at != at:
            pipe.snapshot_at, pipe.snapshot = at, {}
        # one batch per stage and key, before anything else ran in that stage: after a
        # change, reads go one by one (a batch per change would cost more than it saves)
        if (at[0], key) not in pipe.batched and pipe.wanted.get(key):
            pipe.batched.add((at[0], key))
            _run_batch(original, self, key, kwargs, pipe)
            if pipe.snapshot_at != _stage_key(self, pipe):  # something ran meanwhile
                pipe.snapshot = {}
        answer = pipe.snapshot.get((key, text))
        if answer is None:
            _stats.miss(self.name, command)
            return original(self, *args, **kwargs)
        _stats.bump(_stats.served, self.name)
        status, lines = answer
        return status, CommandOutput(list(lines))

    return run_shell_command


def _wrap_put_file(original: Callable[..., Any]) -> Callable[..., Any]:
    def put_file(self: Host, *args: Any, **kwargs: Any) -> Any:
        pipe = _pipe(self)
        if not pipe.reading:
            pipe.generation += 1
        return original(self, *args, **kwargs)

    return put_file


def _wrap_execute(original: Callable[..., Any]) -> Callable[..., Any]:
    """A Python callback or an rsync may change the host by other means than a command
    (an HTTP call, a file copy): the snapshot is dropped when one runs."""

    def execute(self: Any, state: State, host: Host, *args: Any, **kwargs: Any) -> Any:
        pipe = _pipe(host)
        if not pipe.reading:
            pipe.generation += 1
        return original(self, state, host, *args, **kwargs)

    return execute


@contextmanager
def reading(host: Host) -> Iterator[None]:
    """Commands an operation runs only to read state (staging a private file's content to
    compare it on the controller): they keep the snapshot, and are never batched.

    .. code:: python

        with pipeline.reading(host):
            old = _current_content(host, state, path)
    """
    pipe = _pipe(host)
    outer = pipe.reading
    pipe.reading = True
    try:
        yield
    finally:
        pipe.reading = outer


def _arguments(cls: type, args: Any, kwargs: Any) -> tuple[tuple[str, Any], ...]:
    """The fact's arguments by name (as its ``command`` names them), global ones left out."""
    try:
        bound = inspect.signature(cls().command).bind_partial(
            *(args or ()), **{k: v for k, v in (kwargs or {}).items() if not k.startswith("_")}
        )
    except (TypeError, ValueError):
        return ()
    return tuple(sorted((k, _hashable(v)) for k, v in bound.arguments.items()))


def _hashable(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _hashable(v)) for k, v in value.items()))
    return value if isinstance(value, str | int | float | bool | None) else repr(value)


@contextmanager
def direct(host: Host) -> Iterator[None]:
    """Fact reads that go to the host one by one and stay out of the wishlist (one fact
    read before the deploy decides what to plan: not worth the whole wishlist).

    .. code:: python

        with pipeline.direct(host):
            now = host.get_fact(SealCheck)
    """
    pipe = _pipe(host)
    outer = pipe.direct
    pipe.direct = True
    try:
        yield
    finally:
        pipe.direct = outer


def _wrap_get_fact(original: Callable[..., Any]) -> Callable[..., Any]:
    def _get_fact(state: State, host: Host, cls: type, *args: Any, **kwargs: Any) -> Any:
        pipe = _pipe(host)
        outer = pipe.in_fact, pipe.current
        fact_args = args[0] if args else kwargs.get("args")
        fact_kwargs = args[1] if len(args) > 1 else kwargs.get("kwargs")
        pipe.in_fact, pipe.current = True, (cls, _arguments(cls, fact_args, fact_kwargs))
        try:
            return original(state, host, cls, *args, **kwargs)
        finally:
            pipe.in_fact, pipe.current = outer

    return _get_fact


class _SaveOnDisconnect(BaseStateCallback):
    @staticmethod
    def host_disconnect(state: State, host: Host) -> None:
        pipe: _HostPipe | None = getattr(host, "_gpunode_pipe", None)
        if pipe is not None and enabled(state):
            _save_wishlist(host.name, pipe.seen)
            pipe.seen = {}


def install(state: State | None = None) -> None:
    """Wrap pyinfra's fact reads (once per process) and save each host's wishlist when
    ``state`` (default: pyinfra's current one) disconnects from it."""
    global _installed
    with _lock:
        if not _installed:
            pyinfra_facts._get_fact = _wrap_get_fact(pyinfra_facts._get_fact)  # type: ignore[assignment]
            Host.run_shell_command = _wrap_run_shell_command(Host.run_shell_command)  # type: ignore[method-assign]
            Host.put_file = _wrap_put_file(Host.put_file)  # type: ignore[method-assign]
            for command in (FunctionCommand, RsyncCommand):
                command.execute = _wrap_execute(command.execute)  # type: ignore[method-assign]
            _installed = True
    if state is None:
        from pyinfra.context import ctx_state

        state = ctx_state.get()
    if state is not None and not getattr(state, "_gpunode_pipeline", False):
        state.add_callback_handler(_SaveOnDisconnect())
        state._gpunode_pipeline = True  # type: ignore[union-attr]
