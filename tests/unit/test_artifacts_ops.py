"""The artifact store's operations (``fetch``, ``switch``, ``prune`` in
gpunode/operations/artifacts.py) run through pyinfra's API on its ``@local`` connector:
every fact (``StoreDigests``, ``Links``) and every command is a real ``sh`` on this machine,
over a store, a mirror and a service directory under ``tmp_path``. test_artifacts.py tests
the shell scripts alone; this tests what the operations decide around them, the part a
role relies on:

- ``fetch``: a digest the store already holds costs no command at all (the idempotence
  that keeps a second deploy from downloading a model again); a digest it does not hold
  (even with another version there) is downloaded and verified before it lands; a tarball
  is unpacked under the entry named; a blob whose checksum differs fails the operation
  and leaves the store as it was; a mirror that redirects is followed (http, a real
  server on loopback), and a download that fails says why (curl's own error);
- ``switch``: ``current`` moves to the target by renames only (at every step of the
  script ``current`` still points at the old or the new version, never nowhere), the old
  target becomes ``previous``, the version switched to becomes the newest for ``prune``,
  and switching to the version already current runs nothing and touches nothing;
- ``prune``: keeps the newest N versions plus every version a link points at (the current
  one even when it is the oldest), through the link globs the operation is given.

Commands are counted at the connector, during the operation's run only (facts are read
before it), so "no command" means the operation yielded nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shlex
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyinfra
import pytest
from harness import blob, tarball
from pyinfra.api import Config, Inventory, State
from pyinfra.api.connect import connect_all
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.operation import add_op
from pyinfra.api.operations import run_ops
from pyinfra.connectors.local import LocalConnector

from gpunode.facts.artifacts import Links, StoreDigests
from gpunode.operations.artifacts import fetch, prune, switch

# --- helpers --------------------------------------------------------------------------


class RecordingLocalConnector(LocalConnector):
    """pyinfra's ``@local`` connector, recording each command it runs (while ``recording``)."""

    def __init__(self, state, host) -> None:
        super().__init__(state, host)
        self.recording = False
        self.commands: list[str] = []

    def run_shell_command(self, command, print_output=False, print_input=False, **arguments):
        if self.recording:
            self.commands.append(str(command.get_raw_value()))
        return super().run_shell_command(command, print_output, print_input, **arguments)


@dataclass
class OpRun:
    """One operation run on this machine: the commands it ran, whether it changed something
    and whether it failed."""

    commands: list[str]
    changed: bool
    failed: bool


def run_op(op: Callable[..., Any], facts: Callable[[Any], dict[str, Any]], **kwargs: Any) -> OpRun:
    """Run ``op`` on ``@local`` through pyinfra's API. ``facts(host)`` reads the operation's
    fact arguments for real (``host.get_fact``) after connecting and before the run, the
    way a role passes them."""
    assert not pyinfra.is_cli  # add_op refuses to run in CLI mode
    inventory = Inventory((["@local"], {}))
    for each in inventory:
        each.connector_cls = RecordingLocalConnector
    state = State(inventory, Config())
    host = inventory.get_host("@local")
    connect_all(state)
    connector = host.connector
    assert isinstance(connector, RecordingLocalConnector)
    meta = add_op(state, op, **facts(host), **kwargs)[host]
    connector.recording = True
    try:
        run_ops(state)
    except PyinfraError:  # "No hosts remaining": the only host failed
        assert host in state.failed_hosts
    connector.recording = False
    failed = host in state.failed_hosts
    return OpRun(list(connector.commands), not failed and meta.did_change(), failed)


def digests_of(store: Path) -> Callable[[Any], dict[str, Any]]:
    return lambda host: {"present": host.get_fact(StoreDigests, store=str(store))}


def links_of(directory: Path) -> Callable[[Any], dict[str, Any]]:
    return lambda host: {"links": host.get_fact(Links, directory=str(directory))}


def no_facts(host: Any) -> dict[str, Any]:
    return {}


def snapshot(root: Path, dir_mtimes: bool = True) -> dict[str, tuple[int, int, bytes | str | None]]:
    """Every path under ``root``: its inode, its mtime (a directory's only if ``dir_mtimes``:
    a temporary entry made and removed changes it) and its content or link target."""
    out: dict[str, tuple[int, int, bytes | str | None]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        mtime = st.st_mtime_ns
        if path.is_symlink():
            value: bytes | str | None = os.readlink(path)
        elif path.is_file():
            value = path.read_bytes()
        else:
            value, mtime = None, mtime if dir_mtimes else 0
        out[path.relative_to(root).as_posix()] = (st.st_ino, mtime, value)
    return out


def versions(store: Path, *ages: int) -> list[str]:
    """Store versions (directories named by digest), the first the newest, each ``ages[i]``
    hundred seconds older than now-ish (a fixed clock, so the order is certain)."""
    names = []
    for i, age in enumerate(ages):
        digest = hashlib.sha256(f"version {i}".encode()).hexdigest()
        (store / "sha256" / digest / "model").mkdir(parents=True)
        os.utime(store / "sha256" / digest, (1_000_000 - age * 100, 1_000_000 - age * 100))
        names.append(digest)
    return names


# --- fetch ------------------------------------------------------------------------------


def test_fetch_of_a_digest_already_in_the_store_runs_nothing(tmp_path: Path) -> None:
    store = tmp_path / "store"
    uri, digest = blob(tmp_path, "m.gguf", b"GGUF model bytes")
    first = run_op(fetch, digests_of(store), store=str(store), uri=uri, sha256=digest)
    assert first.changed and len(first.commands) == 1, first
    before = snapshot(store)
    # the mirror's copy is gone: a second download would fail the operation
    (tmp_path / "mirror" / "m.gguf").unlink()
    again = run_op(fetch, digests_of(store), store=str(store), uri=uri, sha256=digest)
    assert again == OpRun(commands=[], changed=False, failed=False)
    assert snapshot(store) == before


def test_fetch_of_a_digest_not_in_the_store_downloads_and_verifies_it(tmp_path: Path) -> None:
    store = tmp_path / "store"
    old_uri, old = blob(tmp_path, "old.gguf", b"the version before")
    assert run_op(fetch, digests_of(store), store=str(store), uri=old_uri, sha256=old).changed
    uri, digest = blob(tmp_path, "new.gguf", b"GGUF model bytes, new")
    run = run_op(fetch, digests_of(store), store=str(store), uri=uri, sha256=digest)
    assert run.changed and not run.failed
    assert len(run.commands) == 1
    assert "curl " in run.commands[0] and "sha256sum" in run.commands[0]
    stored = store / "sha256" / digest / "model"
    assert stored.read_bytes() == b"GGUF model bytes, new"
    assert oct(stored.stat().st_mode & 0o777) == "0o644"  # a plain file, not unpacked
    assert sorted(os.listdir(store / "sha256")) == sorted([old, digest])  # no leftovers
    assert (store / "sha256" / old / "model").read_bytes() == b"the version before"


def test_fetch_of_a_blob_with_another_checksum_fails_and_changes_nothing(tmp_path: Path) -> None:
    store = tmp_path / "store"
    good_uri, good = blob(tmp_path, "good.gguf", b"good")
    assert run_op(fetch, digests_of(store), store=str(store), uri=good_uri, sha256=good).changed
    before = snapshot(store, dir_mtimes=False)
    bad_uri, _ = blob(tmp_path, "bad.gguf", b"tampered on the mirror")
    claimed = hashlib.sha256(b"what the config says").hexdigest()
    run = run_op(fetch, digests_of(store), store=str(store), uri=bad_uri, sha256=claimed)
    assert run.failed and len(run.commands) == 1
    assert (
        snapshot(store, dir_mtimes=False) == before
    )  # nothing placed, no temporary directory left


def test_fetch_unpacks_a_tarball_under_the_entry_named(tmp_path: Path) -> None:
    store = tmp_path / "store"
    data = tarball({"bin/llama-server": b"#!/bin/sh\necho ok\n", "share/LICENSE": b"MIT"})
    uri, digest = blob(tmp_path, "rt.tar.gz", data)
    run = run_op(
        fetch,
        digests_of(store),
        store=str(store),
        uri=uri,
        sha256=digest,
        entry="root",
        unpack=True,
    )
    assert run.changed and not run.failed, run
    top = store / "sha256" / digest
    assert os.listdir(top) == ["root"]  # no blob, no "model" entry
    root = top / "root"
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == [
        "bin/llama-server",
        "share/LICENSE",
    ]
    assert (root / "share/LICENSE").read_bytes() == b"MIT"


@pytest.fixture
def mirror() -> Iterator[tuple[str, str]]:
    """An http mirror on loopback: ``/models/m.gguf`` moved (302) to ``/blobs/m.gguf``.
    Yields the old URI and the blob's sha256."""
    data = b"GGUF model bytes behind a redirect"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            if self.path == "/models/m.gguf":
                self.send_response(302)
                self.send_header("Location", "/blobs/m.gguf")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/blobs/m.gguf":
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            else:
                self.send_error(404)

        def log_message(self, *args: Any) -> None:
            pass

    server = None
    for port in random.sample(range(18000, 19000), 1000):  # the project's test port range
        try:
            server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
            break
        except OSError:
            continue
    assert server is not None, "no free port in 18000-18999"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        yield f"http://127.0.0.1:{port}/models/m.gguf", hashlib.sha256(data).hexdigest()
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_fetch_follows_a_mirror_that_redirects(tmp_path: Path, mirror: tuple[str, str]) -> None:
    store = tmp_path / "store"
    uri, digest = mirror
    run = run_op(fetch, digests_of(store), store=str(store), uri=uri, sha256=digest)
    assert run.changed and not run.failed, run
    stored = store / "sha256" / digest / "model"
    assert stored.read_bytes() == b"GGUF model bytes behind a redirect"


def test_a_failed_download_says_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    store = tmp_path / "store"
    missing = f"file://{tmp_path}/mirror/not-there.gguf"
    run = run_op(fetch, digests_of(store), store=str(store), uri=missing, sha256="0" * 64)
    assert run.failed and len(run.commands) == 1
    # curl's own reason (its -S), not a bare failure
    assert "curl: (37)" in caplog.text and "not-there.gguf" in caplog.text, caplog.text
    assert not (store / "sha256" / ("0" * 64)).exists()


# --- switch -------------------------------------------------------------------------------


def spy_path(tmp: Path, directory: Path) -> str:
    """A PATH whose ``ln``, ``mv``, ``rm``, ``unlink`` and ``touch`` first log where
    ``<directory>/current`` points (empty: nowhere), then run the real command."""
    bindir = tmp / "spy-bin"
    bindir.mkdir(exist_ok=True)
    log = tmp / "spy.log"
    current = shlex.quote(str(directory / "current"))
    for name in ("ln", "mv", "rm", "unlink", "touch"):
        tool = bindir / name
        tool.write_text(
            "#!/bin/sh\n"
            f'echo "{name} current=$(readlink {current})" >> {shlex.quote(str(log))}\n'
            f'PATH="$SPY_REAL_PATH" exec {name} "$@"\n'
        )
        tool.chmod(0o755)
    return str(bindir)


def spy_log(tmp: Path) -> list[str]:
    log = tmp / "spy.log"
    lines = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return lines


def test_switch_moves_current_by_renames_and_keeps_the_previous_version(tmp_path: Path) -> None:
    store = tmp_path / "store"
    v1, v2 = (store / "sha256" / d for d in versions(store, 0, 1))
    svc = tmp_path / "svc"
    svc.mkdir()
    real = os.environ["PATH"]
    env = {"PATH": f"{spy_path(tmp_path, svc)}:{real}", "SPY_REAL_PATH": real}

    first = run_op(switch, links_of(svc), directory=str(svc), target=str(v1), _env=env)
    assert first.changed and not first.failed, first
    assert os.readlink(svc / "current") == str(v1)
    assert not (svc / "previous").exists() and not (svc / "previous").is_symlink()
    assert spy_log(tmp_path)  # the spies ran: the checks below are not vacuous

    second = run_op(switch, links_of(svc), directory=str(svc), target=str(v2), _env=env)
    assert second.changed and not second.failed, second
    assert os.readlink(svc / "current") == str(v2)
    assert os.readlink(svc / "previous") == str(v1)
    assert sorted(os.listdir(svc)) == ["current", "previous"]  # no .new links left
    # before each step of the script, `current` pointed at the old or the new version
    steps = spy_log(tmp_path)
    assert len(steps) >= 3, steps
    assert all(line.split(" ", 1)[1] in {f"current={v1}", f"current={v2}"} for line in steps)
    assert not any(line.startswith(("rm ", "unlink ")) for line in steps), steps


def test_switch_makes_the_version_used_the_newest_for_prune(tmp_path: Path) -> None:
    store = tmp_path / "store"
    newest, middle, oldest = versions(store, 0, 1, 2)
    svc = tmp_path / "svc" / "chat"
    svc.mkdir(parents=True)
    target = str(store / "sha256" / oldest)
    assert run_op(switch, links_of(svc), directory=str(svc), target=target).changed
    # keep=2 without the links: the two used most recently are the one switched to and
    # the newest fetched; the middle one goes
    run = run_op(prune, no_facts, store=str(store), link_globs=[], keep=2)
    assert not run.failed, run
    assert sorted(os.listdir(store / "sha256")) == sorted([newest, oldest])


def test_switch_to_the_current_version_runs_nothing(tmp_path: Path) -> None:
    store = tmp_path / "store"
    v1, v2 = (store / "sha256" / d for d in versions(store, 0, 1))
    svc = tmp_path / "svc"
    svc.mkdir()
    assert run_op(switch, links_of(svc), directory=str(svc), target=str(v1)).changed
    assert run_op(switch, links_of(svc), directory=str(svc), target=str(v2)).changed
    before = snapshot(tmp_path)
    again = run_op(switch, links_of(svc), directory=str(svc), target=str(v2))
    assert again == OpRun(commands=[], changed=False, failed=False)
    assert snapshot(tmp_path) == before  # the links, and the target's mtime, as they were
    assert os.readlink(svc / "previous") == str(v1)


# --- prune --------------------------------------------------------------------------------


def test_prune_keeps_the_newest_and_the_current_version_even_when_oldest(tmp_path: Path) -> None:
    store = tmp_path / "store"
    digests = versions(store, 0, 1, 2, 3, 4)  # digests[0] newest ... digests[4] oldest
    (store / "sha256" / ".fetch.abc123").mkdir()  # a fetch in progress
    services = tmp_path / "inference"
    for name, linked in (("chat", digests[4]), ("embed", digests[3])):
        (services / name).mkdir(parents=True)
        os.symlink(store / "sha256" / linked, services / name / "current")
    run = run_op(prune, no_facts, store=str(store), link_globs=[f"{services}/*/current"], keep=1)
    assert not run.failed and len(run.commands) == 1, run
    assert sorted(os.listdir(store / "sha256")) == sorted(
        [digests[0], digests[3], digests[4], ".fetch.abc123"]
    )
    # the versions in use are whole
    assert (services / "chat" / "current" / "model").is_dir()
    assert (services / "embed" / "current" / "model").is_dir()


def test_prune_keeps_as_many_as_asked(tmp_path: Path) -> None:
    store = tmp_path / "store"
    digests = versions(store, 0, 1, 2, 3)
    for keep in (3, 2):
        run = run_op(prune, no_facts, store=str(store), link_globs=[], keep=keep)
        assert not run.failed, run
        assert sorted(os.listdir(store / "sha256")) == sorted(digests[:keep])
