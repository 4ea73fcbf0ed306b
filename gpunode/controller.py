"""The controller: where the scheduled drift run lives on it, and what it is given (a
reproducible archive of this repository and a wheelhouse of gpunode's dependencies, the
wheels ``locks/controller.txt`` names, checked against it: gpunode/locks.py).
roles/controller.py applies it; ``monitoring.drift`` (gpunode/schema/monitoring.py)
configures the timer."""

from __future__ import annotations

import functools
import gzip
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from pathlib import Path

from gpunode import locks
from gpunode.paths import REPO_ROOT
from gpunode.provenance import SOURCE_STAMP

HOME = "/opt/gpunode"


REPO = f"{HOME}/repo"


VENV = f"{HOME}/venv"


WHEELHOUSE = f"{HOME}/wheelhouse"


REQUIREMENTS = f"{HOME}/requirements.lock.txt"  # locks/controller.txt, read by the venv's pip


STATE = "/var/lib/gpunode/controller"


LOCK = "/run/lock/gpunode-drift.lock"


LOCK_BUSY = 75  # EX_TEMPFAIL: another run holds the lock


SERVICE = "gpunode-drift.service"


TIMER = "gpunode-drift.timer"


SOURCE_FILE = SOURCE_STAMP  # commit of the archive, read by gpunode.provenance


# Debian/Ubuntu packages a controller needs (python3-venv: ensurepip for the venv).
APT_PACKAGES = ("python3", "python3-venv", "util-linux", "openssh-client")


# The distro python3 a controller runs gpunode with (gpunode needs 3.11 or newer).
CONTROLLER_PYTHON = {"debian12": "3.11", "ubuntu2404": "3.12"}


def requirements() -> list[str]:
    """gpunode's runtime dependencies, from pyproject.toml."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    return list(project["project"]["dependencies"])


@functools.cache
def wheelhouse(python: str, machine: str) -> bytes:
    """A reproducible .tar of the wheels ``locks/controller.txt`` names for that Python and
    machine: downloaded with pip on this machine (``--require-hashes``, wheels only; once per
    process, cached on disk), then each wheel's sha256 checked against the lock again before
    it is packed. LockError when the lock misses one of pyproject's dependencies, pip fails,
    or a wheel is not a file the lock names."""
    lock = locks.read(locks.CONTROLLER_LOCK)
    missing = [r for r in requirements() if locks.canonical(_name(r)) not in lock.entries]
    if missing:
        raise locks.LockError(
            f"{lock.path} has no entry for {', '.join(missing)} (allowed: a lock of every "
            "dependency in pyproject.toml: run python scripts/lock.py controller)"
        )
    # one folder per lock: a new lock never mixes with an old one's wheels
    cache = Path.home() / ".cache" / "gpunode" / f"wheelhouse-{lock.sha256[:12]}"
    cache = cache / f"py{python}-{machine}"
    cache.mkdir(parents=True, exist_ok=True)
    wheels = _wheels(cache)
    if locks.check_wheels(lock, wheels):  # not there yet, or incomplete: pip fills it
        _download(lock, python, machine, cache)
        wheels = _wheels(cache)
    problems = locks.check_wheels(lock, wheels)
    if problems:
        raise locks.LockError(
            f"the wheelhouse in {cache} is not what {lock.path} locks: {'; '.join(problems)} "
            f"(allowed: the locked wheels: remove {cache} to download them again)"
        )
    return _tar(wheels, compress=False)


def _wheels(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.whl"))}


def _download(lock: locks.Lock, python: str, machine: str, dest: Path) -> None:
    """pip downloads the lock's wheels for that Python and machine; pip checks each file's
    hash against the lock (the text parsed above, not the file again)."""
    platforms = [f"manylinux_2_{n}_{machine}" for n in (36, 34, 31, 28, 24, 17)]
    platforms.append(f"manylinux2014_{machine}")
    with tempfile.TemporaryDirectory() as tmp:
        requirements = Path(tmp) / "controller.lock.txt"
        requirements.write_text(lock.text)
        proc = subprocess.run(
            [
                *(sys.executable, "-m", "pip", "download", "--quiet", "--require-hashes"),
                *("--only-binary=:all:", "--dest", str(dest), "--implementation", "cp"),
                *("--python-version", python),
                *(arg for p in platforms for arg in ("--platform", p)),
                *("-r", str(requirements)),
            ],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-12:])
        raise locks.LockError(
            f"pip could not download the wheels of {lock.path} for Python {python} on "
            f"{machine}:\n{tail}"
        )


def _name(requirement: str) -> str:
    m = re.match(r"[A-Za-z0-9._-]+", requirement)
    return m[0] if m else requirement


@functools.cache
def repository() -> tuple[bytes, str]:
    """(``git archive HEAD`` of this repository plus the source stamp, commit)."""
    commit = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", commit],
        capture_output=True,
        check=True,
    ).stdout
    stamp = json.dumps({"commit": commit, "dirty": False}).encode() + b"\n"
    with tarfile.open(fileobj=io.BytesIO(archive)) as src:
        members = {
            m.name: src.extractfile(m).read()  # type: ignore[union-attr]
            for m in src.getmembers()
            if m.isfile()
        }
    members[SOURCE_FILE] = stamp
    return _tar(members, compress=True), commit


def _tar(members: dict[str, bytes], compress: bool) -> bytes:
    """A byte-for-byte reproducible tar (fixed owners and times): uploaded only on change."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(members[name]), 0, 0o644
            tar.addfile(info, io.BytesIO(members[name]))
    data = raw.getvalue()
    return gzip.compress(data, mtime=0) if compress else data


def repo_path(value: str) -> str:
    return value if value.startswith("/") else f"{REPO}/{value}"
