"""Lock files: every package a pip install of gpunode's takes, pinned to one version and to
the sha256 of each file pip may install for it (pip's hash-checking mode).

A lock is pip's requirements format as ``scripts/lock.py`` writes it (``uv pip compile
--generate-hashes --only-binary :all:``): one entry per package, ``name==version`` and one
or more ``--hash=sha256:<64 hex>``, continued over lines with ``\\``, and ``#`` comment
lines. Nothing else is accepted (no options, URLs, markers, extras, ``-r``/``-c``): a lock
is parsed and checked here, then uploaded as a file (root, 0644) and read by
``pip install --require-hashes --only-binary=:all: -r FILE``; it is never put on a command
line. A lock is fully resolved (every dependency is an entry), so pip resolves nothing
itself: a dependency missing from it stops the install. Wheels only: an sdist would be
built with build dependencies pip does not hash-check.

The locks gpunode ships are in ``locks/``: ``controller.txt`` (the controller's wheelhouse,
gpunode's own dependencies) and ``runtimes/<pins>.txt`` (inference runtimes installed with
method pip; an inventory may name its own with ``inference.runtimes.<r>.lock``).

.. code:: python

    lock = read(CONTROLLER_LOCK)
    lock.entries["pyinfra"].version     # "3.10.0"
    install_command("/opt/gpunode/venv/bin/pip", "/opt/gpunode/requirements.lock")
"""

from __future__ import annotations

import functools
import hashlib
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG

from gpunode.paths import REPO_ROOT

LOCKS_DIR = REPO_ROOT / "locks"
CONTROLLER_LOCK = LOCKS_DIR / "controller.txt"
RUNTIME_LOCKS = LOCKS_DIR / "runtimes"
MAX_BYTES = 4 * 1024 * 1024  # a lock of a large runtime (vLLM, every platform's hashes): ~0.3 MB

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_ENTRY = re.compile(
    rf"(?P<name>{_NAME})==(?P<version>[A-Za-z0-9.+!_-]+)"
    r"(?P<hashes>(?: --hash=sha256:[0-9a-f]{64})+)"
)
_PIN = re.compile(
    r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[(?P<extras>[A-Za-z0-9,._-]+)\])?==(?P<version>\S+)"
)
LINE_FORMAT = "name==version --hash=sha256:<64 hex> [--hash=...]"

# pip's options for every locked install: hashes checked, wheels only, no prompt.
PIP_OPTIONS = ("--require-hashes", "--only-binary=:all:", "--no-input", "--quiet")


class LockError(ValueError):
    """A lock file that is missing, unreadable or not of the accepted format."""


@dataclass(frozen=True)
class Entry:
    name: str  # canonical (PEP 503: lower case, runs of - _ . as one -)
    version: str
    hashes: frozenset[str]


@dataclass(frozen=True)
class Lock:
    path: str
    text: str
    entries: Mapping[str, Entry]  # canonical name -> entry

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def missing(self, installed: Mapping[str, Iterable[str]]) -> list[str]:
        """The entries (``name==version``) not in ``installed`` (pyinfra's ``PipPackages``
        fact: name -> versions)."""
        have = {canonical(name): set(versions) for name, versions in installed.items()}
        return [
            f"{e.name}=={e.version}"
            for e in self.entries.values()
            if e.version not in have.get(e.name, set())
        ]

    def unpinned(self, pins: Iterable[str]) -> list[str]:
        """The pins (``name[extras]==version``) this lock does not hold at that version."""
        out = []
        for pin in pins:
            m = _PIN.fullmatch(pin)
            entry = self.entries.get(canonical(m["name"])) if m else None
            if m is None or entry is None or entry.version != m["version"]:
                out.append(pin)
        return out


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse(text: str, path: str) -> Lock:
    """The lock in ``text`` (read from ``path``, named in errors); LockError if any line is
    not an entry or a comment."""
    bad = re.search(r"[^\x20-\x7e\n]", text)
    if bad:
        at = text.count("\n", 0, bad.start()) + 1
        raise LockError(
            f"{path} line {at}: control or non-ASCII character {bad[0]!r} "
            "(allowed: printable ASCII lines)"
        )
    entries: dict[str, Entry] = {}
    logical: list[str] = []
    start = 0
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if not logical:
            if not line or line.startswith("#"):
                continue
            start = number
        logical.append(line.removesuffix("\\"))
        if not line.endswith("\\"):
            entry = _entry(" ".join(" ".join(logical).split()), f"{path} line {start}")
            if entry.name in entries:
                raise LockError(
                    f"{path} line {start}: {entry.name} is locked twice (allowed: once)"
                )
            entries[entry.name] = entry
            logical = []
    if logical:
        raise LockError(f"{path} line {start}: ends with a continuation '\\' (allowed: an entry)")
    if not entries:
        raise LockError(f"{path}: no locked requirement (allowed: {LINE_FORMAT} lines)")
    return Lock(path, text, entries)


def _entry(logical: str, where: str) -> Entry:
    m = _ENTRY.fullmatch(logical)
    if m is None:
        raise LockError(
            # the line itself is not shown: a file that is no lock may hold anything
            f"{where}: not a locked requirement (allowed: {LINE_FORMAT}, or a # comment)"
        )
    hashes = frozenset(h.removeprefix("--hash=sha256:") for h in m["hashes"].split())
    return Entry(canonical(m["name"]), m["version"], hashes)


def read(path: Path | str) -> Lock:
    """The lock file at ``path`` on this machine, parsed and checked (LockError if not)."""
    name = str(Path(path).expanduser())
    try:
        stat = Path(name).stat()
    except OSError as exc:
        raise LockError(
            f"{name}: cannot be read: {exc.strerror} (allowed: a readable lock file)"
        ) from None
    if not S_ISREG(stat.st_mode):  # a FIFO or a device would block or never end
        raise LockError(f"{name}: not a regular file (allowed: a lock file)")
    return _read(name, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=32)
def _read(path: str, mtime_ns: int, size: int) -> Lock:
    """Parsed once per file version (config load checks the lock of every host)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise LockError(
            f"{path}: cannot be read: {exc.strerror} (allowed: a readable lock file)"
        ) from None
    if len(data) > MAX_BYTES:
        raise LockError(f"{path}: larger than {MAX_BYTES} bytes (allowed: a lock file)")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise LockError(f"{path}: not ASCII text (allowed: a lock file)") from None
    return parse(text, path)


def runtime_lock_name(pins: Iterable[str]) -> str:
    """The file under ``locks/runtimes/`` for these pins: ``vllm==0.6.6.post1`` ->
    ``vllm-0.6.6.post1.txt`` (sorted, joined with ``+``)."""
    parts = []
    for pin in pins:
        m = _PIN.fullmatch(pin)
        if m is None:
            raise LockError(f"{pin[:60]!r} is not a pin (allowed: name==version)")
        extras = sorted(canonical(e) for e in (m["extras"] or "").split(",") if e)
        name = canonical(m["name"]) + (f"[{','.join(extras)}]" if extras else "")
        parts.append(f"{name}-{m['version']}")
    return "+".join(sorted(parts)) + ".txt"


def install_command(
    pip: str,
    lock: str,
    index_url: str | None = None,
    find_links: str | None = None,
    reinstall: bool = False,
) -> str:
    """The shell command that installs the lock file at ``lock`` (on the host) with ``pip``:
    hash-checked, wheels only, every value quoted.

    >>> install_command("/v/bin/pip", "/v.lock", index_url="https://pypi.internal/simple")
    "/v/bin/pip install --require-hashes --only-binary=:all: --no-input --quiet --index-url https://pypi.internal/simple -r /v.lock"
    """  # noqa: E501
    argv = [pip, "install", *PIP_OPTIONS]
    if find_links is not None:
        argv += ["--no-index", "--find-links", find_links]
    elif index_url is not None:
        argv += ["--index-url", index_url]
    if reinstall:
        argv.append("--force-reinstall")
    return shlex.join([*argv, "-r", lock])


def wheel_name_version(filename: str) -> tuple[str, str]:
    """(canonical name, version) of a wheel's file name (PEP 427: name-version-...whl)."""
    parts = filename.removesuffix(".whl").split("-")
    if not filename.endswith(".whl") or len(parts) not in (5, 6):
        raise LockError(f"{filename[:80]!r} is not a wheel file name (allowed: PEP 427 names)")
    return canonical(parts[0]), parts[1]


def check_wheels(lock: Lock, wheels: Mapping[str, bytes]) -> list[str]:
    """Problems with a wheelhouse (file name -> content) against ``lock``: a wheel that is not
    locked, at another version, or whose sha256 the lock does not list; a locked package
    with no wheel. [] when every wheel is what the lock names."""
    problems, named = [], set()
    for filename, data in sorted(wheels.items()):
        try:
            name, version = wheel_name_version(filename)
        except LockError as exc:
            problems.append(str(exc))
            continue
        named.add(name)
        entry = lock.entries.get(name)
        digest = hashlib.sha256(data).hexdigest()
        if entry is None or entry.version != version:
            problems.append(f"{filename}: not in {lock.path} (locked: {_locked(entry)})")
        elif digest not in entry.hashes:
            problems.append(
                f"{filename}: sha256 {digest} is not one {lock.path} lists for "
                f"{name}=={version} (a file that is not the one locked)"
            )
    for name in sorted(set(lock.entries) - named):
        problems.append(f"{name}=={lock.entries[name].version}: no wheel for it")
    return problems


def _locked(entry: Entry | None) -> str:
    return "not at all" if entry is None else f"{entry.name}=={entry.version}"
