"""The artifact store's shell scripts (gpunode/operations/artifacts.py), run for real by sh,
curl, tar, sha256sum and coreutils on a temporary directory: the same scripts pyinfra sends
to a node. ``file://`` URIs are a local mirror (curl reads them like http)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from harness import blob, tarball

from gpunode.facts.artifacts import Links, StoreDigests
from gpunode.operations.artifacts import fetch_script, prune_script, revert_script, switch_script


def sh(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)


def test_fetch_verifies_then_moves_into_place(tmp_path: Path) -> None:
    store = tmp_path / "store"
    uri, digest = blob(tmp_path, "m.gguf", b"GGUF model bytes")
    proc = sh(fetch_script(str(store), uri, digest, "model", unpack=False))
    assert proc.returncode == 0, proc.stderr
    stored = store / "sha256" / digest / "model"
    assert stored.read_bytes() == b"GGUF model bytes"
    assert oct(stored.stat().st_mode & 0o777) == "0o644"
    assert os.listdir(store / "sha256") == [digest]  # no temporary directory left


def test_the_store_is_readable_by_services_under_any_session_umask(tmp_path: Path) -> None:
    """gpunode's session may have umask 027 (pam_umask with login.defs' UMASK, as on Ubuntu):
    the store's directories, made by the script, still let a service user through."""
    store = tmp_path / "store"
    uri, digest = blob(tmp_path, "rt.tar.gz", tarball({"bin/server": b"#!/bin/sh\n"}))
    script = fetch_script(str(store), uri, digest, "root", unpack=True)
    proc = subprocess.run(["sh", "-c", f"umask 027 && {script}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    final = store / "sha256" / digest
    for path in (store, store / "sha256", final, final / "root", final / "root" / "bin"):
        assert path.stat().st_mode & 0o005 == 0o005, (path, oct(path.stat().st_mode))


def test_checksum_mismatch_changes_nothing(tmp_path: Path) -> None:
    store = tmp_path / "store"
    good_uri, good = blob(tmp_path, "good.gguf", b"good")
    assert sh(fetch_script(str(store), good_uri, good, "model", unpack=False)).returncode == 0
    bad_uri, _ = blob(tmp_path, "bad.gguf", b"tampered")
    claimed = hashlib.sha256(b"what the config says").hexdigest()
    proc = sh(fetch_script(str(store), bad_uri, claimed, "model", unpack=False))
    assert proc.returncode == 1
    assert f"checksum mismatch for {bad_uri}: expected {claimed}" in proc.stderr
    assert "the store and the links are unchanged" in proc.stderr
    assert os.listdir(store / "sha256") == [good]  # nothing new, no leftovers


def test_failed_download_changes_nothing(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.joinpath("sha256").mkdir(parents=True)
    missing = f"file://{tmp_path}/mirror/not-there.gguf"
    proc = sh(fetch_script(str(store), missing, "0" * 64, "model", unpack=False))
    assert proc.returncode != 0
    assert os.listdir(store / "sha256") == []


def test_fetch_unpacks_a_tarball(tmp_path: Path) -> None:
    store = tmp_path / "store"
    data = tarball({"bin/llama-server": b"#!/bin/sh\necho ok\n", "share/LICENSE": b"MIT"})
    uri, digest = blob(tmp_path, "rt.tar.gz", data)
    proc = sh(fetch_script(str(store), uri, digest, "root", unpack=True))
    assert proc.returncode == 0, proc.stderr
    root = store / "sha256" / digest / "root"
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == [
        "bin/llama-server",
        "share/LICENSE",
    ]
    assert subprocess.run([root / "bin/llama-server"], capture_output=True).stdout == b"ok\n"
    assert not (store / "sha256" / digest / "blob").exists()


def test_switch_is_a_rename_and_keeps_the_previous_version(tmp_path: Path) -> None:
    svc = tmp_path / "svc"
    svc.mkdir()
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    v1.mkdir()
    v2.mkdir()
    assert sh(switch_script(str(svc), str(v1), None)).returncode == 0
    assert os.readlink(svc / "current") == str(v1)
    assert not (svc / "previous").exists()
    assert sh(switch_script(str(svc), str(v2), str(v1))).returncode == 0
    assert os.readlink(svc / "current") == str(v2)
    assert os.readlink(svc / "previous") == str(v1)
    assert sorted(os.listdir(svc)) == ["current", "previous"]  # no .new links left

    proc = sh(revert_script(str(svc)))
    assert proc.returncode == 0, proc.stderr
    assert os.readlink(svc / "current") == str(v1)
    assert os.readlink(svc / "previous") == str(v2)


def test_revert_without_a_previous_version_fails_and_changes_nothing(tmp_path: Path) -> None:
    svc = tmp_path / "svc"
    svc.mkdir()
    (tmp_path / "v1").mkdir()
    sh(switch_script(str(svc), str(tmp_path / "v1"), None))
    proc = sh(revert_script(str(svc)))
    assert proc.returncode == 1
    assert "no previous version" in proc.stderr
    assert os.readlink(svc / "current") == str(tmp_path / "v1")


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_prune_keeps_the_newest_and_every_linked_version(tmp_path: Path, keep: int) -> None:
    store = tmp_path / "store" / "sha256"
    store.mkdir(parents=True)
    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(6)]
    for age, digest in enumerate(digests):  # digests[0] newest ... digests[5] oldest
        (store / digest).mkdir()
        os.utime(store / digest, (1_000_000 - age * 100, 1_000_000 - age * 100))
    (store / ".fetch.abc123").mkdir()  # a fetch in progress is never touched
    svc = tmp_path / "svc" / "chat"
    svc.mkdir(parents=True)
    os.symlink(store / digests[4], svc / "current")  # an old version still in use
    os.symlink(store / digests[5], svc / "previous")
    globs = [f"{tmp_path}/svc/*/current", f"{tmp_path}/svc/*/previous"]
    proc = sh(prune_script(str(tmp_path / "store"), globs, keep))
    assert proc.returncode == 0, proc.stderr
    left = set(os.listdir(store))
    assert left == {*digests[:keep], digests[4], digests[5], ".fetch.abc123"}


def test_facts_parse_their_commands_real_output(tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / "sha256" / ("a" * 64)).mkdir(parents=True)
    (store / "sha256" / ".fetch.x").mkdir()
    out = sh(StoreDigests().command(str(store))).stdout.splitlines()
    assert StoreDigests().process(out) == ["a" * 64]
    assert StoreDigests().process(sh(StoreDigests().command("/nonexistent")).stdout.split()) == []

    svc = tmp_path / "svc"
    svc.mkdir()
    os.symlink("/var/lib/gpunode/models/sha256/" + "a" * 64, svc / "current")
    out = sh(Links().command(str(svc))).stdout.splitlines()
    assert Links().process(out) == {
        "current": "/var/lib/gpunode/models/sha256/" + "a" * 64,
        "previous": "",
    }
