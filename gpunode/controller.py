"""The controller: where the scheduled drift run lives on it, and what it is given (a
reproducible archive of this repository and a wheelhouse of gpunode's dependencies).
roles/controller.py applies it; ``monitoring.drift`` (gpunode/schema/monitoring.py)
configures the timer."""

from __future__ import annotations

import functools
import gzip
import io
import json
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

from gpunode.paths import REPO_ROOT
from gpunode.provenance import SOURCE_STAMP

HOME = "/opt/gpunode"


REPO = f"{HOME}/repo"


VENV = f"{HOME}/venv"


WHEELHOUSE = f"{HOME}/wheelhouse"


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
    """A reproducible .tar of the wheels for gpunode's dependencies on that Python and
    machine (downloaded with pip on this machine, once per process; cached on disk)."""
    cache = Path.home() / ".cache" / "gpunode" / f"wheelhouse-py{python}-{machine}"
    cache.mkdir(parents=True, exist_ok=True)
    stamp = cache / "requirements.json"
    wanted = json.dumps(requirements())
    if not stamp.exists() or stamp.read_text() != wanted:
        for old in cache.glob("*.whl"):
            old.unlink()
        platforms = [f"manylinux_2_{n}_{machine}" for n in (36, 34, 31, 28, 24, 17)]
        platforms.append(f"manylinux2014_{machine}")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--dest",
                str(cache),
                "--only-binary=:all:",
                "--python-version",
                python,
                "--implementation",
                "cp",
                *(arg for p in platforms for arg in ("--platform", p)),
                *requirements(),
            ],
            check=True,
            stdin=subprocess.DEVNULL,
        )
        stamp.write_text(wanted)
    return _tar({p.name: p.read_bytes() for p in sorted(cache.glob("*.whl"))}, compress=False)


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


def quote_requirement(requirement: str) -> str:
    return "'" + requirement.replace("'", "") + "'"
