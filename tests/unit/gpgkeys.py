"""Real OpenPGP keyrings for the signing-key tests, made with this machine's ``gpg``.

Not a test module: test modules import it as ``from gpgkeys import ...`` (tests/unit is
on ``sys.path``, like ``harness``). ``make_keyrings`` generates two throwaway keys in a
private gpg home and writes the keyrings the tests feed to gpunode:

* ``exact``: the pinned key only (key A, with a signing subkey, armored, as publishers
  ship them), the file a host must have;
* ``extra``: key A plus key B in one file (the poisoned keyring of issue 13, finding 7);
* ``other``: key B only (binary, as ``gpg --dearmor`` writes keyrings);
* ``garbage``: a file that is not a key at all.

``run_real`` runs a command written for a path on a host against a local file instead,
with ``sh`` and the real ``gpg``: what the host would print, never typed by hand.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Keyrings:
    pinned: str  # key A's fingerprint (what a test pins)
    other: str  # key B's fingerprint
    files: dict[str, Path]  # exact, extra, other, garbage


def _gpg(home: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--no-tty", *args],
        check=True,
        capture_output=True,
        timeout=60,
    )


def _fingerprint(home: Path, email: str) -> str:
    out = _gpg(home, "--with-colons", "--list-keys", email).stdout.decode()
    lines = out.splitlines()
    pub = next(i for i, line in enumerate(lines) if line.startswith("pub:"))
    return lines[pub + 1].split(":")[9]


def make_keyrings(directory: Path) -> Keyrings:
    home = directory / "gnupg"
    home.mkdir(mode=0o700)
    for uid in ("Pinned Publisher <a@example.com>", "Intruder <b@example.com>"):
        _gpg(home, "--passphrase", "", "--quick-gen-key", uid, "ed25519", "cert", "never")
    pinned, other = _fingerprint(home, "a@example.com"), _fingerprint(home, "b@example.com")
    # a signing subkey under A: its fingerprint is in the listing too, but it is not a
    # primary key and must not count as one
    _gpg(home, "--passphrase", "", "--quick-add-key", pinned, "ed25519", "sign", "never")
    files = {name: directory / f"{name}.key" for name in ("exact", "extra", "other", "garbage")}
    files["exact"].write_bytes(_gpg(home, "--armor", "--export", pinned).stdout)
    files["extra"].write_bytes(_gpg(home, "--armor", "--export", pinned, other).stdout)
    files["other"].write_bytes(_gpg(home, "--export", other).stdout)
    files["garbage"].write_text("<html>404 Not Found</html>\n")
    return Keyrings(pinned=pinned, other=other, files=files)


def run_real(command: str, host_path: str, local: Path) -> subprocess.CompletedProcess[str]:
    """Run ``command`` (written for ``host_path`` on a host) on ``local`` with sh."""
    assert host_path in command, f"{host_path} not in {command}"
    return subprocess.run(
        ["sh", "-c", command.replace(host_path, shlex.quote(str(local)))],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")},
    )
