"""File operations beyond pyinfra's: a private file (a credential, a secret) onto a node
without leaking it (:func:`private_file`; :func:`secret_file` writes one Vault secret as an
env file through it), and an existing file's owner and mode (:func:`file_mode`).

How a private file's content never leaks:

* it travels inside a :class:`MaskedBytes` (or a :class:`~gpunode.clients.vault.SecretValue`),
  whose ``repr`` is masked: the operation arguments pyinfra prints show no value;
* it goes up over SFTP, never on a command line, into a temporary file in the target's
  directory that ``install -m MODE -o OWNER -g GROUP /dev/null`` created empty with its
  final owner and mode; ``mv -f`` then renames it over the old file (atomic);
* it is never diffed: these operations print no diff, even with ``--diff``;
* a converged file is recognised without printing anything derived from the value: the
  fact (:class:`~gpunode.facts.files.PrivateFileState`) gives owner, group and mode only,
  and the current content is read over SFTP into memory and compared here, on the
  controller; only "same" or "differs" is logged (at ``-vvv``).

SFTP runs as the login user (with ``--sudo``, doas, dzdo or su too), so both directions
pass through a fresh staging directory ``/tmp/gpunode-secret-*`` that the login user
creates 0700, and the file is copied between it and its place by the operation's own
(escalated) ``cat``/``cp``: never pyinfra's escalated transfers, whose download copy is
world-readable and whose upload staging file stays behind when the copy fails. The staging
directory and the temporary file are removed on every path, success or failure.

Every value reaches the shell quoted (``QuoteString``), whatever the caller passes.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import posixpath
import secrets as _random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pyinfra import host, logger, state
from pyinfra.api import (
    FileUploadCommand,
    FunctionCommand,
    OperationError,
    QuoteString,
    StringCommand,
    operation,
)
from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS, auth_argument_meta
from pyinfra.api.exceptions import OperationValueError
from pyinfra.api.util import print_host_combined_output
from pyinfra.facts.files import File

from gpunode import pipeline
from gpunode.clients.vault import SecretValue
from gpunode.facts.files import FileDigest, PrivateFileState

STAGING_PREFIX = "/tmp/gpunode-secret-"  # noqa: S108 (a fresh 0700 directory each time)


@dataclass(frozen=True)
class MaskedBytes:
    """A private file's content. ``repr`` and ``str`` show the label, never the data."""

    label: str
    data: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"MaskedBytes({self.label!r}, *MASKED*)"

    __str__ = __repr__


@operation()
def private_file(path: str, content: MaskedBytes, user: str, group: str, mode: str):
    """
    Write a private file (a credential, a key) atomically and without leaking it.
    Changes only when the content, owner, group or mode differ; nothing derived from
    the content is ever printed (no diff, no hash).

    + path: the file on the node (its directory must exist)
    + content: the bytes, masked
    + user, group, mode: the file's final owner and mode (set before any byte is written)

    .. code:: python

        private_file(
            name="Drift run credential file", path="/etc/gpunode/controller/id_ed25519",
            content=MaskedBytes("fleet SSH key", Path("~/.ssh/fleet").expanduser().read_bytes()),
            user="root", group="root", mode="0600",
        )
    """
    want = _mode(mode)
    current = host.get_fact(PrivateFileState, path=path)
    if current is not None and current["type"] == "other":
        raise OperationError(f"{path} exists and is not a regular file (allowed: a file)")
    if current is not None and current["type"] == "file":
        with pipeline.reading(host):  # staging commands that change nothing the facts saw
            old = _current_content(host, state, path)
        same = old is not None and hmac.compare_digest(old, content.data)
        if state.print_fact_output:
            host.log(f"private file {path}: content {'same' if same else 'differs'}")
        if same:
            yield from _owner_and_mode(path, current, user, group, want)
            return
    yield FunctionCommand(_write, (path, content, user, group, want), {})


@operation()
def secret_file(path: str, secret: SecretValue, env: str, user: str, group: str, mode: str):
    """
    Write one secret as ``ENV=value`` into an env file: a :func:`private_file`. An empty
    value is refused.

    + path: the env file on the node (its directory must exist)
    + secret: the value read from Vault (``gpunode.clients.vault.Session.read``)
    + env: the variable name in the file
    + user, group, mode: the file's final owner and mode (set before any byte is written)

    .. code:: python

        value = session_for(config.vault).read("llm_api_key", secret)
        secret_file(
            name="Secret file", path="/etc/gpunode/secrets/llm_api_key.env",
            secret=value, env="API_KEY", user="root", group="llm", mode="0640",
        )
    """
    if not secret.value:
        raise OperationValueError(
            f"secret {secret.name} (version {secret.version}): the value is empty "
            "(allowed: a non-empty value)"
        )
    content = MaskedBytes(f"secret {secret.name}", secret.env_line(env).encode())
    yield from private_file._inner(path=path, content=content, user=user, group=group, mode=mode)


@operation()
def file_mode(path: str, user: str, group: str, mode: str):
    """
    Set an existing file's owner, group and mode (``000`` included, which pyinfra's
    ``files.file`` skips); a missing file is left missing.

    .. code:: python

        file_mode(name="shadow", path="/etc/shadow", user="root", group="root", mode="000")
    """
    info = host.get_fact(File, path=path)
    if not info:
        host.noop(f"{path} does not exist")
        return
    if (info["user"], info["group"]) != (user, group):
        yield StringCommand("chown", QuoteString(f"{user}:{group}"), QuoteString(path))
    if info["mode"] != int(mode):
        yield StringCommand("chmod", QuoteString(mode), QuoteString(path))


# --- helpers --------------------------------------------------------------------------------


def checked_install(
    path: str,
    content: str,
    mode: str,
    install: Callable[[str, str], str],
    fact: type[FileDigest] = FileDigest,
) -> Iterator[Any]:
    """The commands of an operation that writes a root-owned file only once its checker
    accepts it: none when the file already has this content, owner (root:root) and mode;
    else the file staged beside it as ``.<name>.gpunode-new`` (owner and mode before any
    content), then ``install(staged, path)``, a script that checks the staged file and moves
    it in place or removes it and fails."""
    current = host.get_fact(fact, path=path)
    wanted = hashlib.sha256(content.encode()).hexdigest()
    if current == {"user": "root", "group": "root", "mode": mode, "sha256": wanted}:
        host.noop(f"{path} is as wanted")
        return
    directory, base = posixpath.split(path)
    staged = posixpath.join(directory, f".{base}.gpunode-new")
    yield StringCommand("install", "-m", mode, "-o", "root", "-g", "root", "/dev/null", staged)
    yield upload(io.BytesIO(content.encode()), staged)
    yield install(staged, path)


def upload(src: Any, dest: str) -> FileUploadCommand:
    """An upload staged where pyinfra's own ``files.put`` stages it: in the operation's
    ``_temp_dir`` (gpunode sets it to the login's own, see
    :func:`gpunode.operations.server.stage_uploads_as_login`), not in the directory pyinfra
    would look up under sudo."""
    given: dict[str, Any] = dict(host.current_op_global_arguments or {})
    temp_dir = given.get("_temp_dir")
    temp = host.get_temp_filename(dest, temp_directory=temp_dir) if temp_dir else None
    return FileUploadCommand(src, dest, remote_temp_filename=temp)


def _mode(mode: str) -> str:
    if not 1 <= len(mode) <= 4 or any(c not in "01234567" for c in mode):
        raise OperationValueError(f"mode {mode!r} (allowed: an octal mode such as 0600)")
    return mode.lstrip("0").rjust(3, "0")


def _owner_and_mode(path: str, current: dict[str, str], user: str, group: str, want: str):
    """Owner and mode of a file whose content is right, never looser on the way: first the
    bits both modes share, then the owner, then the new mode."""
    old, new = int(current["mode"], 8), int(want, 8)
    if old & new != old:
        yield StringCommand("chmod", f"{old & new:03o}", QuoteString(path))
    if (current["user"], current["group"]) != (user, group):
        yield StringCommand("chown", QuoteString(f"{user}:{group}"), QuoteString(path))
    if old & new != new:
        yield StringCommand("chmod", want, QuoteString(path))


def _connector_arguments(on: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The running operation's connector arguments: (as given, as the login user)."""
    given = dict(on.current_op_global_arguments or {})
    args = {k: given[k] for k in CONNECTOR_ARGUMENT_KEYS if k in given}
    login = {k: v for k, v in args.items() if k not in auth_argument_meta and k != "_chdir"}
    return args, login


def _sh(on: Any, st: Any, args: dict[str, Any], *bits: Any, quiet: bool = False) -> bool:
    """Run one command; a failure's output is shown as pyinfra shows a failed command's
    (none of these commands prints any content: ``cat`` writes into a file)."""
    ok, out = on.run_shell_command(
        StringCommand(*bits), print_output=st.print_output, print_input=st.print_input, **args
    )
    if not ok and not quiet and not st.print_output:
        print_host_combined_output(on, out)
    return bool(ok)


def _transfer_args(st: Any, login: dict[str, Any]) -> dict[str, Any]:
    # a plain transfer as the login user; its "file uploaded" line names only the path
    return {"print_output": st.print_output, "print_input": st.print_input, **login}


def _staging(on: Any, st: Any, login: dict[str, Any]) -> str | None:
    """A fresh staging directory, 0700 and the login user's, holding an empty 0600 file
    ``f``; None if it could not be made (``mkdir`` refuses a name that exists). Transfers
    name only this path: pyinfra's connectors put some paths on a command line unquoted."""
    stage = f"{STAGING_PREFIX}{_random.token_hex(8)}"
    made = _sh(on, st, login, "umask 077 && mkdir --", QuoteString(stage), "&& : >", _in(stage))
    return stage if made else None


def _in(stage: str) -> QuoteString:
    return QuoteString(f"{stage}/f")


def _current_content(on: Any, st: Any, path: str) -> bytes | None:
    """The file's content, into memory through a staging directory (never printed, never
    a readable copy); None if unreadable. The staging directory is always removed."""
    args, login = _connector_arguments(on)
    stage = _staging(on, st, login)
    if stage is None:
        return None
    buf = io.BytesIO()
    try:
        ok = _sh(
            on, st, args, "cat --", QuoteString(path), ">", _in(stage), quiet=True
        ) and on.get_file(f"{stage}/f", buf, **_transfer_args(st, login))
    except Exception:  # noqa: BLE001 (unreadable for any reason: the file is rewritten)
        ok = False
    finally:
        _sh(on, st, login, "rm -rf --", QuoteString(stage))
    return buf.getvalue() if ok else None


def _write(
    state: Any, host: Any, path: str, content: MaskedBytes, user: str, group: str, mode: str
) -> bool:
    """At execution (a ``FunctionCommand``: pyinfra passes ``state`` and ``host``): the
    temporary file with its final owner and mode, the content over SFTP into a staging
    directory, copied into the temporary file, the rename; staging and temporary file
    removed on every path."""
    args, login = _connector_arguments(host)
    directory, base = posixpath.split(path)
    tmp = QuoteString(posixpath.join(directory, f".{base}.gpunode-new"))
    stage: str | None = None
    done = False
    try:
        # empty, with its final owner and mode, before any content exists (install
        # replaces a leftover, creating the new file 0600; -T: never into a directory)
        if not _sh(
            host, state, args,
            "install -m", QuoteString(mode), "-o", QuoteString(user), "-g", QuoteString(group),
            "-T -- /dev/null", tmp,
        ):  # fmt: skip
            return False
        stage = _staging(host, state, login)
        done = (
            stage is not None
            and host.put_file(
                io.BytesIO(content.data), f"{stage}/f", **_transfer_args(state, login)
            )
            # cp onto an existing file keeps that file's owner and mode
            and _sh(host, state, args, "cp --", _in(stage), tmp)
            and _sh(host, state, args, "mv -f --", tmp, QuoteString(path))
        )
    except Exception as exc:  # noqa: BLE001 (an SFTP or connection error: report, clean up)
        host.log_styled(
            f"private file {path}: {exc.__class__.__name__}: {exc}", fg="red", log_func=logger.error
        )
    finally:
        if stage is not None:
            _sh(host, state, login, "rm -rf --", QuoteString(stage))
        if not done:
            _sh(host, state, args, "rm -f --", tmp)
    return bool(done)
