"""Pinned repository signing keys (gpunode/facts/keys.py, gpunode/operations/keys.py),
with this machine's real gpg on real keyrings (tests/unit/gpgkeys.py): the fact's command
and the check operation's command run for real, and the fact's ``process`` reads what the
command printed. A keyring is accepted only when its primary keys equal the pinned set.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from gpgkeys import Keyrings, make_keyrings, run_real

from gpunode import nomad as hashicorp
from gpunode import nvidia as nv
from gpunode.facts.keys import Keyring
from gpunode.operations.keys import check_keyring, keyring_problem

HOST_PATH = "/usr/share/keyrings/example-archive-keyring.asc"


@pytest.fixture(scope="module")
def keyrings(tmp_path_factory: pytest.TempPathFactory) -> Keyrings:
    return make_keyrings(tmp_path_factory.mktemp("keys"))


def fact(local: Path) -> dict | None:
    """The Keyring fact on a host whose HOST_PATH is ``local``: real command, real gpg."""
    proc = run_real(Keyring().command(path=HOST_PATH), HOST_PATH, local)
    assert proc.returncode == 0, proc.stderr
    return Keyring().process(proc.stdout.splitlines()) if proc.stdout else None


# --- the fact, and the plan-time verdict --------------------------------------------------


def test_exact_keyring_is_accepted(keyrings: Keyrings) -> None:
    found = fact(keyrings.files["exact"])
    # the signing subkey's fpr line is in gpg's listing, but only the primary key counts
    assert found == {"fingerprints": [keyrings.pinned], "gpg": True}
    assert keyring_problem("gpu-01", HOST_PATH, found, [keyrings.pinned]) is None
    assert keyring_problem("gpu-01", HOST_PATH, found, [keyrings.pinned.lower()]) is None


def test_keyring_with_an_extra_key_is_refused(keyrings: Keyrings) -> None:
    found = fact(keyrings.files["extra"])
    assert found == {"fingerprints": sorted([keyrings.pinned, keyrings.other]), "gpg": True}
    problem = keyring_problem("gpu-01", HOST_PATH, found, [keyrings.pinned])
    assert problem is not None
    assert problem.startswith(f"host gpu-01: {HOST_PATH} holds primary keys ")
    assert keyrings.other in problem and f"expected exactly {keyrings.pinned}" in problem
    assert "(allowed: " in problem


@pytest.mark.parametrize("name", ["other", "garbage"])
def test_keyring_without_the_pinned_key_is_refused(keyrings: Keyrings, name: str) -> None:
    found = fact(keyrings.files[name])
    assert found is not None and found["gpg"] is True
    assert found["fingerprints"] == ([keyrings.other] if name == "other" else [])
    problem = keyring_problem("gpu-01", HOST_PATH, found, [keyrings.pinned])
    assert problem and f"expected exactly {keyrings.pinned}" in problem


def test_missing_keyring_is_none(tmp_path: Path) -> None:
    assert fact(tmp_path / "absent.asc") is None
    assert keyring_problem("gpu-01", HOST_PATH, None, ["A" * 40]) is None


def test_without_gpg_the_fact_says_so(keyrings: Keyrings, tmp_path: Path) -> None:
    """A host with the file but no gpg: nothing read, nothing accepted at plan time (the
    check operation runs on the host after gpg is installed)."""
    command = Keyring().command(path=HOST_PATH).replace(HOST_PATH, str(keyrings.files["extra"]))
    bindir = tmp_path / "bin"  # a PATH with the shell's tools but no gpg
    bindir.mkdir()
    proc = subprocess.run(
        ["/bin/sh", "-c", command], capture_output=True, text=True, env={"PATH": str(bindir)}
    )
    assert proc.returncode == 0, proc.stderr
    state = Keyring().process(proc.stdout.splitlines())
    assert state == {"fingerprints": [], "gpg": False}
    assert keyring_problem("gpu-01", HOST_PATH, state, ["A" * 40]) is None


def test_the_fact_reads_no_home_and_leaves_nothing_behind(keyrings: Keyrings) -> None:
    command = Keyring().command(path=HOST_PATH)
    assert "--homedir" in command and 'rm -rf "$home"' in command
    assert "--import " not in command  # --show-keys: nothing is imported anywhere


# --- the check right after a download, on the host -------------------------------------------


def check_command(fingerprints: tuple[str, ...]) -> str:
    (command,) = list(check_keyring._inner(path=HOST_PATH, fingerprints=fingerprints))
    return str(command)


def test_check_accepts_the_exact_keyring_and_keeps_it(keyrings: Keyrings, tmp_path: Path) -> None:
    local = tmp_path / "k.asc"
    local.write_bytes(keyrings.files["exact"].read_bytes())
    proc = run_real(check_command((keyrings.pinned,)), HOST_PATH, local)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert local.exists()


@pytest.mark.parametrize("name", ["extra", "other", "garbage"])
def test_check_removes_a_bad_keyring_and_fails(
    keyrings: Keyrings, tmp_path: Path, name: str
) -> None:
    local = tmp_path / "k.asc"
    local.write_bytes(keyrings.files[name].read_bytes())
    proc = run_real(check_command((keyrings.pinned,)), HOST_PATH, local)
    assert proc.returncode == 1
    assert not local.exists()  # apt never sees it
    found = {"extra": f"{min(keyrings.pinned, keyrings.other)} "
                      f"{max(keyrings.pinned, keyrings.other)}",
             "other": keyrings.other, "garbage": "none"}[name]  # fmt: skip
    assert proc.stderr.strip() == (
        f"gpunode: {local} holds primary keys: {found}; expected exactly: {keyrings.pinned} "
        "(the file was removed)"
    )


def test_check_wants_every_pinned_key(keyrings: Keyrings, tmp_path: Path) -> None:
    """Equality, not inclusion, both ways: a keyring missing one of two pinned keys fails."""
    local = tmp_path / "k.asc"
    local.write_bytes(keyrings.files["exact"].read_bytes())
    proc = run_real(check_command((keyrings.pinned, keyrings.other)), HOST_PATH, local)
    assert proc.returncode == 1 and not local.exists()
    local.write_bytes(keyrings.files["extra"].read_bytes())
    both = (keyrings.other.lower(), keyrings.pinned)
    assert run_real(check_command(both), HOST_PATH, local).returncode == 0


# --- the pin tables -----------------------------------------------------------------------------


def test_every_pin_is_a_full_fingerprint() -> None:
    pins = [
        *hashicorp.HASHICORP_KEY_FINGERPRINTS,
        *(f for fs in nv.NVIDIA_KEYS.values() for f in fs),
    ]
    assert pins and all(re.fullmatch(r"[0-9A-F]{40}", f) for f in pins)
    # every key file a repository row names is pinned
    assert {repo.key for repo in nv.CUDA_REPOS.values()} | {nv.CONTAINER_TOOLKIT_KEY} <= set(
        nv.NVIDIA_KEYS
    )
