"""The drift seal (gpunode/seal.py, gpunode/sealcheck.py, gpunode/facts/seal.py,
gpunode/operations/seal.py and the seal's part of gpunode/commands/drift.py), unit by unit.

Everything that can run here runs for real:

- ``gpunode-seal`` (gpunode/sealcheck.py) records and checks real files, directories,
  symlinks and ``/bin/sh`` commands under ``tmp_path`` (its seal path pointed there), and
  once as a script under the system's ``python3 -I`` (standard library only, as on a node);
- the GPU presence projection runs the fact's own shell command with a fake probe and a
  fake PCI bus under ``tmp_path``, fed with the probe outputs recorded on a real H100
  (tests/unit/fixtures/gpu/);
- input digests are computed from real inventories (inventories/example.py, and
  ``from_yaml`` inventories under ``tmp_path``), in this process and in others;
- Vault inputs are checked against a real OpenBao dev server (harness.start_bao).

tests/lab/test_seal.py compares the seal with the full plan on real hosts; this file
checks each part on its own, including the cases a lab host cannot easily show. Tests
whose docstring describes a bug fail until it is fixed.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shlex
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import need_root
from pyinfra.api.host import Host
from pyinfra.context import ctx_host
from pyinfra.facts import deb, files, rpm, server, systemd

from gpunode import pipeline, probe
from gpunode import seal as sealing
from gpunode.commands import drift, run
from gpunode.facts import seal as seal_facts
from gpunode.facts.files import FileDigest, PrivateFileState
from gpunode.facts.gateway import Certificate
from gpunode.facts.nvidia import GpuProbe
from gpunode.facts.seal import (
    DPKG_LIST,
    GPU_PRESENCE,
    RPM_LIST,
    UNIT_FILES,
    SealCheck,
    entries,
    judge,
    proven,
    vault_reason,
)
from gpunode.operations.seal import current
from gpunode.paths import REPO_ROOT
from gpunode.pipeline import FactRead

sealcheck = importlib.import_module("gpunode.sealcheck")

FIXTURES = Path(__file__).parent / "fixtures" / "gpu" / "nvidia-h100-80gb-hbm3"
SYSTEM_PYTHON = "/usr/bin/python3"
SHELL_TIMEOUT = 60
OTHER_UID = 65534  # nobody / nogroup


# --- gpunode-seal (gpunode/sealcheck.py), for real under tmp_path ----------------------


@pytest.fixture
def seal_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "state" / "seal.json"
    monkeypatch.setattr(sealcheck, "SEAL", str(path))
    return path


def write_spec(path: Path, doc: Any) -> Path:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def record(
    tmp_path: Path,
    listed: list[tuple[str, str]],
    inputs: str = "inputs-1",
    extra: dict[str, Any] | None = None,
) -> int:
    spec = write_spec(
        tmp_path / "spec.json",
        {"inputs": inputs, "extra": extra or {}, "entries": [list(e) for e in listed]},
    )
    return int(sealcheck.record(str(spec)))


def check(capsys: pytest.CaptureFixture[str]) -> tuple[dict[str, Any], str]:
    """``gpunode-seal check``: its JSON line and its whole output (stdout + stderr)."""
    capsys.readouterr()
    assert sealcheck.check() == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1, out
    return json.loads(out), out + err


class Node:
    """A small node under tmp_path: the things a seal's entries look at."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self.conf = root / "app.conf"
        self.conf.write_text("listen 8080\n")
        self.conf.chmod(0o640)
        self.secret = root / "secret.env"
        self.secret.write_text("API_KEY=s3cret-file-value\n")
        self.secret.chmod(0o600)
        self.dir = root / "conf.d"
        self.dir.mkdir()
        self.dir.chmod(0o750)
        self.link = root / "current"
        self.link.symlink_to("app.conf")
        self.absent = root / "absent"
        self.out = root / "out.txt"
        self.out.write_text("active\n")
        self.rc = root / "rc.txt"
        self.rc.write_text("0")
        self.err = root / "err.txt"
        self.err.write_text("")

    def entries(self) -> list[tuple[str, str]]:
        return [
            ("path", str(self.conf)),
            ("path", str(self.secret)),
            ("path", str(self.dir)),
            ("path", str(self.link)),
            ("path", str(self.absent)),
            ("sh", f"cat {shlex.quote(str(self.out))}"),  # sh #5
            ("sh", f'exit "$(cat {shlex.quote(str(self.rc))})"'),  # sh #6
            ("sh", f"cat {shlex.quote(str(self.err))} >&2"),  # sh #7
        ]


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path / "node")


def test_record_then_check_is_ok_with_nothing_different(
    tmp_path: Path, seal_path: Path, node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = {"vault": [["secret", "gpunode/llm", 3]], "pki": [], "expires": 1900000000}
    assert record(tmp_path, node.entries(), inputs="abc123", extra=extra) == 0
    doc, _ = check(capsys)
    assert doc == {
        "seal": "ok",
        "inputs": "abc123",
        "extra": extra,
        # the controller's ids (gpunode.seal.entry_id) are the node's
        "ids": [sealing.entry_id(kind, arg) for kind, arg in node.entries()],
        "differs": [],
    }
    # and again: a check changes nothing it looks at
    assert check(capsys)[0]["differs"] == []


def chown_away(path: Path) -> None:
    need_root("giving a file to another user")
    os.lchown(path, OTHER_UID, -1)


def chgrp_away(path: Path) -> None:
    need_root("giving a file to another group")
    os.lchown(path, -1, OTHER_UID)


def to_symlink(path: Path) -> None:
    # the same content behind it: the path itself is no longer that file
    copy = path.with_name(path.name + ".real")
    copy.write_bytes(path.read_bytes())
    copy.chmod(stat.S_IMODE(path.stat().st_mode))
    path.unlink()
    path.symlink_to(copy.name)


def retarget(node: Node) -> None:
    node.link.unlink()
    node.link.symlink_to("secret.env")


CHANGES: dict[str, tuple[Callable[[Node], None], Callable[[Node], str]]] = {
    "file content": (lambda n: n.conf.write_text("listen 9090\n"), lambda n: f"path {n.conf}"),
    "file content, same size": (
        lambda n: n.secret.write_text("API_KEY=s3cret-file-valuE\n"),
        lambda n: f"path {n.secret}",
    ),
    "file mode": (lambda n: n.conf.chmod(0o644), lambda n: f"path {n.conf}"),
    "file owner": (lambda n: chown_away(n.conf), lambda n: f"path {n.conf}"),
    "file group": (lambda n: chgrp_away(n.secret), lambda n: f"path {n.secret}"),
    "file removed": (lambda n: n.conf.unlink(), lambda n: f"path {n.conf}"),
    "file replaced by a symlink": (lambda n: to_symlink(n.conf), lambda n: f"path {n.conf}"),
    "directory mode": (lambda n: n.dir.chmod(0o755), lambda n: f"path {n.dir}"),
    "directory owner": (lambda n: chown_away(n.dir), lambda n: f"path {n.dir}"),
    "directory replaced by a file": (
        lambda n: (n.dir.rmdir(), n.dir.write_text("")),
        lambda n: f"path {n.dir}",
    ),
    "symlink target": (retarget, lambda n: f"path {n.link}"),
    "missing path created": (lambda n: n.absent.mkdir(), lambda n: f"path {n.absent}"),
    "sh stdout": (lambda n: n.out.write_text("inactive\n"), lambda n: "sh #5"),
    "sh exit status": (lambda n: n.rc.write_text("3"), lambda n: "sh #6"),
    "sh stderr": (lambda n: n.err.write_text("warning\n"), lambda n: "sh #7"),
}


@pytest.mark.parametrize("change", list(CHANGES), ids=list(CHANGES))
def test_each_change_is_detected_and_named(
    tmp_path: Path,
    seal_path: Path,
    node: Node,
    capsys: pytest.CaptureFixture[str],
    change: str,
) -> None:
    assert record(tmp_path, node.entries()) == 0
    make, named = CHANGES[change]
    make(node)
    doc, _ = check(capsys)
    assert doc["seal"] == "ok"
    # the symlink to app.conf is sealed with what it points to: a change there shows on it
    # too when what a read through it sees changed (not when app.conf became a link to an
    # identical file)
    assert named(node) in doc["differs"]
    assert set(doc["differs"]) <= {named(node), f"path {node.link}"}
    if change in ("file content", "file mode", "file removed"):
        assert f"path {node.link}" in doc["differs"]


def test_every_change_at_once_is_named_in_entry_order(
    tmp_path: Path, seal_path: Path, node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    assert record(tmp_path, node.entries()) == 0
    for name in ("file content", "directory mode", "symlink target", "sh stdout", "sh stderr"):
        CHANGES[name][0](node)
    doc, _ = check(capsys)
    assert doc["differs"] == [
        f"path {node.conf}",
        f"path {node.dir}",
        f"path {node.link}",
        "sh #5",
        "sh #7",
    ]


def test_times_are_not_drift(
    tmp_path: Path, seal_path: Path, node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    assert record(tmp_path, node.entries()) == 0
    for path in (node.conf, node.secret, node.dir, node.out):
        path.read_bytes() if path.is_file() else list(path.iterdir())  # reading: atime
        before = path.stat()
        os.utime(path, ns=(before.st_atime_ns + 10**12, before.st_mtime_ns))
        assert path.stat().st_atime_ns != before.st_atime_ns
    # a file rewritten with the same content: a new mtime and ctime, the same state
    node.conf.write_text(node.conf.read_text())
    os.utime(node.secret, ns=(1, 1))
    assert check(capsys)[0]["differs"] == []


def test_a_missing_seal(seal_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check(capsys)[0] == {"seal": "missing"}


UNREADABLE: dict[str, bytes | None] = {
    "not JSON": b'{"version": 1, "entries": [',
    "empty": b"",
    "binary": b"\xff\xfe\x00",
    "a list": b"[]",
    "null": b"null",
    "unknown version": json.dumps({"version": 2, "inputs": "x", "entries": []}).encode(),
    "no version": json.dumps({"inputs": "x", "entries": []}).encode(),
    "entries not a list": json.dumps({"version": 1, "entries": {}}).encode(),
    "an entry of two": json.dumps({"version": 1, "entries": [["path", "/x"]]}).encode(),
    "an entry not a list": json.dumps({"version": 1, "entries": ["path /x d"]}).encode(),
    # well-formed JSON of the right shape but the wrong types (a disk or hand gone wrong)
    "an entry of numbers": json.dumps({"version": 1, "entries": [[1, 2, 3]]}).encode(),
    "a path that is a number": json.dumps(
        {"version": 1, "entries": [["path", 5, "d" * 64]]}
    ).encode(),
    "a directory": None,
}


@pytest.mark.parametrize("content", list(UNREADABLE), ids=list(UNREADABLE))
def test_an_unreadable_seal(
    seal_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    seal_path.parent.mkdir(parents=True)
    data = UNREADABLE[content]
    if data is None:
        seal_path.mkdir()
    else:
        seal_path.write_bytes(data)
    doc, _ = check(capsys)
    assert doc["seal"] == "unreadable"
    assert "differs" not in doc and "ids" not in doc


def test_the_seal_is_written_0600_and_atomically(
    tmp_path: Path, seal_path: Path, node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.umask(0o000)  # a permissive umask must not loosen the seal
    try:
        assert record(tmp_path, node.entries(), inputs="first") == 0
    finally:
        os.umask(0o022)
    assert stat.S_IMODE(seal_path.stat().st_mode) == 0o600
    assert [p.name for p in seal_path.parent.iterdir()] == ["seal.json"]  # no temp file
    # a new seal replaces the old one by rename: whoever had the old one open (a hard link
    # here) still reads the whole old seal, never a half-written new one
    old = tmp_path / "old-seal.json"
    os.link(seal_path, old)
    first = old.read_bytes()
    assert record(tmp_path, node.entries(), inputs="second") == 0
    assert old.read_bytes() == first
    assert json.loads(seal_path.read_text())["inputs"] == "second"
    assert seal_path.stat().st_ino != old.stat().st_ino
    assert stat.S_IMODE(seal_path.stat().st_mode) == 0o600
    assert sorted(p.name for p in seal_path.parent.iterdir()) == ["seal.json"]


def test_the_spec_is_removed(tmp_path: Path, seal_path: Path, node: Node) -> None:
    spec = tmp_path / "spec.json"
    assert record(tmp_path, node.entries()) == 0
    assert not spec.exists()


MALFORMED: dict[str, Any] = {
    "not JSON": '{"inputs": "x", "entries": [',
    "a list": [["path", "/etc/hosts"]],
    "entries missing": {"inputs": "x"},
    "entries not a list": {"inputs": "x", "entries": "path /etc/hosts"},
    "entries a mapping": {"inputs": "x", "entries": {"path": "/etc/hosts"}},
    "an entry not a list": {"inputs": "x", "entries": ["path /etc/hosts"]},
    "an entry of one": {"inputs": "x", "entries": [["path"]]},
    "an entry of three": {"inputs": "x", "entries": [["path", "/etc/hosts", "d"]]},
    "unknown kind": {"inputs": "x", "entries": [["file", "/etc/hosts"]]},
    "NUL in a path": {"inputs": "x", "entries": [["path", "/etc/hosts\0x"]]},
    "NUL in a command": {"inputs": "x", "entries": [["sh", "true\0rm -rf /"]]},
    "an empty argument": {"inputs": "x", "entries": [["sh", ""]]},
    "an argument not a string": {"inputs": "x", "entries": [["path", 5]]},
    "inputs not a string": {"inputs": 5, "entries": [["path", "/etc/hosts"]]},
    "inputs missing": {"entries": [["path", "/etc/hosts"]]},
    "a good entry before a bad one": {
        "inputs": "x",
        "entries": [["path", "/etc/hosts"], ["sh", None]],
    },
}


@pytest.mark.parametrize("spec", list(MALFORMED), ids=list(MALFORMED))
def test_a_malformed_spec_is_refused(
    tmp_path: Path, seal_path: Path, capsys: pytest.CaptureFixture[str], spec: str
) -> None:
    path = write_spec(tmp_path / "spec.json", MALFORMED[spec])
    capsys.readouterr()
    assert sealcheck.record(str(path)) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("gpunode-seal: ")
    assert "Traceback" not in err
    assert not seal_path.exists()
    assert not seal_path.parent.exists() or list(seal_path.parent.iterdir()) == []
    assert not path.exists()  # removed even when malformed


def test_a_malformed_spec_leaves_the_seal_in_place(
    tmp_path: Path, seal_path: Path, node: Node
) -> None:
    assert record(tmp_path, node.entries()) == 0
    before = seal_path.read_bytes()
    path = write_spec(tmp_path / "spec.json", MALFORMED["unknown kind"])
    assert sealcheck.record(str(path)) == 2
    assert seal_path.read_bytes() == before


def test_a_missing_spec_is_refused(
    tmp_path: Path, seal_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert sealcheck.record(str(tmp_path / "nothing.json")) == 2
    assert "cannot read the spec" in capsys.readouterr().err
    assert not seal_path.exists()


def test_check_never_prints_a_digest_nor_a_content(
    tmp_path: Path, seal_path: Path, node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    assert record(tmp_path, node.entries()) == 0
    stored = [digest for _, _, digest in json.loads(seal_path.read_text())["entries"]]
    assert len(stored) == len(node.entries())
    secrets = [node.secret.read_bytes(), node.conf.read_bytes(), node.out.read_bytes()]
    # what the node side hashes, before and after the change below
    leaks = {*stored, *(hashlib.sha256(s).hexdigest() for s in secrets)}
    leaks |= {s.decode().strip() for s in secrets}
    _, quiet = check(capsys)  # nothing differs
    for name in CHANGES:
        if name not in ("file owner", "file group", "directory owner"):
            node_change = CHANGES[name][0]
            try:
                node_change(node)
            except (FileNotFoundError, FileExistsError, NotADirectoryError):
                pass  # an earlier change took the path already
    node.secret.write_text("API_KEY=s3cret-file-value-2\n")
    leaks |= {hashlib.sha256(node.secret.read_bytes()).hexdigest()}
    doc, loud = check(capsys)  # everything differs
    assert len(doc["differs"]) >= 8
    for output in (quiet, loud):
        assert not [leak for leak in leaks if leak and leak in output]
        assert "s3cret" not in output


def test_gpunode_seal_runs_as_a_script_on_the_system_python(tmp_path: Path, node: Node) -> None:
    """As on a node: ``python3 -I`` (no site-packages, no environment), standard library
    only, through ``main`` and its usage."""
    if not Path(SYSTEM_PYTHON).exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{SYSTEM_PYTHON} missing and CI=true")
        pytest.skip(f"{SYSTEM_PYTHON} missing")
    script = REPO_ROOT / "gpunode" / "sealcheck.py"
    seal = tmp_path / "state" / "seal.json"
    loader = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('gpunode_seal', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "module.SEAL = sys.argv[2]\n"
        "sys.exit(module.main(['gpunode-seal', *sys.argv[3:]]))\n"
    )

    def seal_cmd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SYSTEM_PYTHON, "-I", "-c", loader, str(script), str(seal), *args],
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin"},
            stdin=subprocess.DEVNULL,
            timeout=SHELL_TIMEOUT,
        )

    assert json.loads(seal_cmd("check").stdout) == {"seal": "missing"}
    spec = write_spec(
        tmp_path / "spec.json",
        {"inputs": "i", "extra": {}, "entries": [list(e) for e in node.entries()]},
    )
    done = seal_cmd("record", str(spec))
    assert (done.returncode, done.stdout, done.stderr) == (0, "sealed 8 entries\n", "")
    assert json.loads(seal_cmd("check").stdout)["differs"] == []
    node.conf.chmod(0o600)
    # and the symlink to it, sealed with what it points to
    assert json.loads(seal_cmd("check").stdout)["differs"] == [
        f"path {node.conf}",
        f"path {node.link}",
    ]
    # the script itself: a wrong call is a usage line and status 2, nothing else
    for args in ([], ["check", "extra"], ["record"], ["seal"]):
        wrong = subprocess.run(
            [SYSTEM_PYTHON, "-I", str(script), *args],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=SHELL_TIMEOUT,
        )
        assert (wrong.returncode, wrong.stdout) == (2, ""), args
        assert wrong.stderr.startswith("usage: gpunode-seal"), args


class Units:
    """A ``systemctl`` on PATH that answers ``show`` as systemd 252 does (one block per unit,
    in order, a blank line between; the properties in systemd's order), from a state file
    per unit; it logs each call."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        bin_dir = root / "bin"
        bin_dir.mkdir(parents=True)
        self.log = root / "calls"
        self.fail = root / "fail"
        tool = bin_dir / "systemctl"
        tool.write_text(
            "#!/bin/sh\n"
            f'echo "$*" >> {self.log}\n'
            f'[ -e {self.fail} ] && {{ echo "Failed to connect to bus" >&2; exit 1; }}\n'
            'while [ "$1" != -- ]; do shift; done; shift; first=1\n'
            "for u; do [ $first = 1 ] || echo; first=0\n"
            f'  echo "Id=$u"; cat "{root}/$u" 2>/dev/null ||'
            ' printf "SubState=dead\\nUnitFileState=\\n"\n'
            "done\n"
        )
        tool.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")

    def set(self, unit: str, sub: str, file_state: str) -> None:
        (self.root / unit).write_text(f"SubState={sub}\nUnitFileState={file_state}\n")

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


def test_units_are_read_with_one_systemctl_and_sealed_one_by_one(
    tmp_path: Path,
    seal_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    units = Units(tmp_path / "units", monkeypatch)
    units.set("a.service", "running", "enabled")
    units.set("b.timer", "waiting", "enabled")
    listed = [
        ("unit", "a.service"),
        ("path", str(tmp_path)),
        ("unit", "b.timer"),
        ("unit", "c.service"),
    ]
    assert record(tmp_path, listed) == 0
    assert units.calls() == [
        "show --all --property Id --property SubState --property UnitFileState -- "
        "a.service b.timer c.service"
    ]
    doc, _ = check(capsys)
    assert doc["differs"] == [] and len(units.calls()) == 2
    units.set("b.timer", "dead", "enabled")  # stopped
    assert check(capsys)[0]["differs"] == ["unit b.timer"]
    units.set("b.timer", "waiting", "disabled")  # running, but disabled
    assert check(capsys)[0]["differs"] == ["unit b.timer"]
    units.set("b.timer", "waiting", "enabled")
    units.set("c.service", "running", "enabled")  # one that was not there started
    assert check(capsys)[0]["differs"] == ["unit c.service"]
    (units.root / "c.service").unlink()
    units.fail.touch()  # systemctl cannot answer: every unit differs, nothing is guessed
    assert check(capsys)[0]["differs"] == ["unit a.service", "unit b.timer", "unit c.service"]


@pytest.mark.parametrize("name", ["a b.service", "a\tb", "ü.service"])
def test_a_unit_entry_with_an_odd_name_makes_a_malformed_spec(
    tmp_path: Path, seal_path: Path, name: str
) -> None:
    assert record(tmp_path, [("unit", name)]) == 2
    assert not seal_path.exists()


def test_the_check_command_ignores_the_sessions_python_environment(tmp_path: Path) -> None:
    """The check runs as root with the SSH session's environment: a PYTHONPATH (or a module
    beside the script) must not put code into it (``python3 -I -S``)."""
    if not Path(SYSTEM_PYTHON).exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{SYSTEM_PYTHON} missing and CI=true")
        pytest.skip(f"{SYSTEM_PYTHON} missing")
    planted = tmp_path / "planted"
    planted.mkdir()
    marker = tmp_path / "imported"
    for name in ("json", "hashlib", "sitecustomize"):
        (planted / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write('{name} ')\n")
    script = planted / "gpunode-seal"
    script.write_text((REPO_ROOT / "gpunode" / "sealcheck.py").read_text())
    command = SealCheck().command().replace(seal_facts.SCRIPT, str(script))
    assert command != SealCheck().command()
    done = subprocess.run(
        ["/bin/sh", "-c", command],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(planted), "PYTHONSTARTUP": str(script)},
        stdin=subprocess.DEVNULL,
        timeout=SHELL_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["seal"] in ("missing", "ok", "unreadable")
    assert not marker.exists(), marker.read_text()


def test_a_change_behind_a_sealed_symlink_is_drift(
    tmp_path: Path, seal_path: Path, node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """A path is sealed by lstat: for a symlink, only its owner and target name. A fact that
    reads through it (FileContents, Sha1File, FileDigest, Certificate ...) sees the target's
    content, which can change while the seal says nothing differs."""
    # what a deploy reads at node.link: pyinfra's Sha1File and FileContents follow it
    facts = [files.Sha1File, files.FileContents]
    reads = [
        FactRead(f, (("path", str(node.link)),), f().command(path=str(node.link)), True)
        for f in facts
    ]
    sealed = entries(reads)
    assert sealed == [("path", str(node.link))]

    def outputs() -> list[str]:
        return [sealcheck.sh_state(str(read.command)) for read in reads]

    assert record(tmp_path, sealed) == 0
    before = outputs()
    node.conf.write_text("listen 9090\n")  # behind the link
    assert outputs() != before  # the facts read something else now: a plan may differ
    assert check(capsys)[0]["differs"] == [f"path {node.link}"]


# --- SealCheck: the fact ----------------------------------------------------------------


def test_the_seal_check_fact_without_a_checker(tmp_path: Path) -> None:
    command = SealCheck().command().replace(seal_facts.SCRIPT, str(tmp_path / "gpunode-seal"))
    assert command != SealCheck().command()
    proc = subprocess.run(
        ["sh", "-c", command], capture_output=True, text=True, timeout=SHELL_TIMEOUT
    )
    assert SealCheck().process(proc.stdout.splitlines()) == {"seal": "no-checker"}


@pytest.mark.parametrize(
    "output", [[], ["not json"], ["[]"], ['{"seal": 1}'], ["{}"], ['{"seal": "ok"', "}x"]]
)
def test_the_seal_check_fact_reads_anything_else_as_unreadable(output: list[str]) -> None:
    assert SealCheck().process(output) == {"seal": "unreadable"}


def test_the_seal_check_fact_keeps_a_check(
    tmp_path: Path, seal_path: Path, node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    assert record(tmp_path, node.entries()) == 0
    _, out = check(capsys)
    assert SealCheck().process(out.splitlines())["ids"] == [
        sealing.entry_id(k, a) for k, a in node.entries()
    ]


# --- entries(): what the seal keeps for each fact read ----------------------------------


def read(fact: type, command: str = "", batchable: bool = True, **arguments: Any) -> FactRead:
    return FactRead(
        fact=fact,
        arguments=tuple(sorted(arguments.items())),
        command=command or f"{fact.__name__} {sorted(arguments.items())}",
        batchable=batchable,
    )


PATH_READERS = [
    files.File,
    files.Directory,
    files.Link,
    files.Sha1File,
    files.Sha256File,
    files.FileContents,
    FileDigest,
    PrivateFileState,
    Certificate,
]


def test_the_sessions_temporary_directory_is_not_sealed() -> None:
    """pyinfra reads TmpDir to stage uploads; pam_tmpdir (the hardening role installs it) gives
    each login its own TMPDIR, so the session that installed it saw another value than every
    later one: sealed, it would unseal the run after a first converge."""
    tmp = read(server.TmpDir, command=server.TmpDir().command())
    other = read(server.Hostname, command="uname -n")
    assert entries([tmp, other]) == [("sh", "uname -n")]


@pytest.mark.parametrize("fact", PATH_READERS, ids=[f.__name__ for f in PATH_READERS])
def test_a_file_fact_is_sealed_by_its_path(fact: type) -> None:
    assert entries([read(fact, path="/etc/gpunode/x.conf")]) == [("path", "/etc/gpunode/x.conf")]


def test_a_path_read_by_several_facts_is_sealed_once() -> None:
    reads = [read(f, path="/etc/x") for f in PATH_READERS]
    assert entries(reads) == [("path", "/etc/x")]


def test_users_and_groups_are_sealed_by_their_files() -> None:
    assert entries([read(server.Users)]) == [("path", "/etc/passwd"), ("path", "/etc/group")]
    assert entries([read(server.Groups)]) == [("path", "/etc/group")]
    assert entries([read(server.Groups), read(server.Users)]) == [
        ("path", "/etc/group"),
        ("path", "/etc/passwd"),
    ]


def test_packages_are_sealed_by_the_whole_list() -> None:
    assert entries([read(deb.DebPackages, "dpkg -l")]) == [("sh", DPKG_LIST)]
    assert entries([read(rpm.RpmPackages, "rpm -qa")]) == [("sh", RPM_LIST)]
    assert "dpkg-query" in DPKG_LIST


def test_every_unit_is_sealed_by_the_unit_files_named_units_by_their_command() -> None:
    status = systemd.SystemdStatus
    assert entries([read(status, "systemctl show '*'")]) == [("sh", UNIT_FILES)]
    assert entries([read(status, "systemctl show '*'", services=None)]) == [("sh", UNIT_FILES)]
    for fact in (systemd.SystemdStatus, systemd.SystemdEnabled):
        named = read(fact, "systemctl show -- nomad.service", services=("nomad.service",))
        assert entries([named]) == [("unit", "nomad.service")]
    # every unit's enablement is stable: sealed by its own command
    enabled = read(systemd.SystemdEnabled, "systemctl list-unit-files")
    assert entries([enabled]) == [("sh", "systemctl list-unit-files")]


def test_named_units_are_sealed_one_entry_each() -> None:
    reads = [
        read(server.Hostname, "uname -n"),
        read(systemd.SystemdStatus, "s a", services=("a.service",)),
        read(files.File, path="/x"),
        read(systemd.SystemdEnabled, "e a", services=("a.service",)),
        read(systemd.SystemdStatus, "s b c", services=("b.timer", "c.service")),
        read(systemd.SystemdEnabled, "e d", services="d.socket"),
    ]
    assert entries(reads) == [
        ("sh", "uname -n"),
        ("unit", "a.service"),
        ("path", "/x"),
        ("unit", "b.timer"),
        ("unit", "c.service"),
        ("unit", "d.socket"),
    ]


@pytest.mark.parametrize("other", [{"user_mode": True}, {"machine": "m"}, {"user_name": "u"}])
def test_units_of_another_manager_are_sealed_by_their_own_command(other: dict[str, Any]) -> None:
    own = read(systemd.SystemdStatus, "own", services=("a.service",), **other)
    plain = read(systemd.SystemdStatus, "plain", services=("a.service",))
    assert entries([own, plain]) == [("sh", "own"), ("unit", "a.service")]


@pytest.mark.parametrize("name", ["a b.service", "a\nb.service", "", "ä.service"])
def test_an_odd_unit_name_is_sealed_by_its_own_command(name: str) -> None:
    odd = read(systemd.SystemdStatus, "odd", services=(name,))
    assert entries([odd]) == [("sh", "odd")]


def test_the_gpu_probe_is_sealed_by_gpu_presence() -> None:
    assert entries([read(GpuProbe, GpuProbe().command())]) == [("sh", GPU_PRESENCE)]


def test_the_seal_check_itself_is_not_sealed() -> None:
    assert entries([read(SealCheck, SealCheck().command())]) == []
    assert entries([read(SealCheck, "x"), read(files.File, path="/x")]) == [("path", "/x")]


def test_any_other_fact_is_sealed_by_its_own_command() -> None:
    reads = [read(server.Sysctl, "sysctl -a"), read(server.Hostname, "uname -n")]
    assert entries(reads) == [("sh", "sysctl -a"), ("sh", "uname -n")]


@pytest.mark.parametrize("where", [0, 2, 4])
def test_one_unbatchable_read_and_nothing_is_sealed(where: int) -> None:
    reads = [read(files.File, path=f"/x{i}") for i in range(4)]
    reads.insert(where, read(server.Command, "echo *MASKED*", batchable=False))
    assert entries(reads) is None


def test_entries_are_in_first_read_order() -> None:
    reads = [
        read(server.Hostname, "uname -n"),
        read(files.File, path="/b"),
        read(server.Users),
        read(deb.DebPackages, "dpkg -l"),
        read(files.Sha1File, path="/a"),
        read(files.File, path="/b"),
        read(server.Hostname, "uname -n"),
        read(GpuProbe, "probe"),
        read(server.Groups),
        read(systemd.SystemdStatus, "systemctl"),
        read(deb.DebPackages, "dpkg -l"),
    ]
    assert entries(reads) == [
        ("sh", "uname -n"),
        ("path", "/b"),
        ("path", "/etc/passwd"),
        ("path", "/etc/group"),
        ("sh", DPKG_LIST),
        ("path", "/a"),
        ("sh", GPU_PRESENCE),
        ("sh", UNIT_FILES),
    ]


# --- the GPU presence projection, through a real sh ------------------------------------

PCI_SYSFS = "/sys/bus/pci/devices"


def presence(probe_path: Path, sysfs: Path) -> str:
    """GPU_PRESENCE with the probe and the PCI bus under tmp_path."""
    assert GPU_PRESENCE.count(probe.PROBE_PATH) == 2 and GPU_PRESENCE.count(PCI_SYSFS) == 1
    return GPU_PRESENCE.replace(probe.PROBE_PATH, str(probe_path)).replace(PCI_SYSFS, str(sysfs))


def fact_command(probe_path: Path, sysfs: Path) -> str:
    """The GpuProbe fact's own command, with the same replacements."""
    command = GpuProbe().command()
    assert command == probe.FACT_COMMAND.format(probe=probe.PROBE_PATH)
    return command.replace(probe.PROBE_PATH, str(probe_path)).replace(PCI_SYSFS, str(sysfs))


def sh(command: str) -> str:
    proc = subprocess.run(
        ["sh", "-c", command],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=SHELL_TIMEOUT,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return proc.stdout


class Gpus:
    """A fake probe (prints a report, exits with a code) and a fake PCI bus."""

    def __init__(self, root: Path) -> None:
        self.probe = root / "gpunode-probe"
        self.report = root / "report.json"
        self.sysfs = root / "pci"
        self.sysfs.mkdir()
        (self.sysfs / "0000:00:00.0").mkdir()  # a host bridge, not NVIDIA
        (self.sysfs / "0000:00:00.0" / "vendor").write_text("0x8086\n")
        (self.sysfs / "0000:00:00.0" / "class").write_text("0x060000\n")

    def installed(self, report: str, code: int) -> None:
        self.report.write_text(report)
        self.probe.write_text(f"#!/bin/sh\ncat {shlex.quote(str(self.report))}\nexit {code}\n")
        self.probe.chmod(0o755)

    def not_installed(self) -> None:
        self.probe.unlink(missing_ok=True)

    def add_pci(self, address: str, vendor: str, cls: str) -> None:
        (self.sysfs / address).mkdir()
        (self.sysfs / address / "vendor").write_text(vendor + "\n")
        (self.sysfs / address / "class").write_text(cls + "\n")

    def fact(self) -> str:
        return sh(fact_command(self.probe, self.sysfs))

    def projection(self) -> str:
        return sh(presence(self.probe, self.sysfs))

    def sealed(self) -> str:
        """What gpunode-seal keeps for the GPU probe: exit status, stdout, stderr."""
        return str(sealcheck.sh_state(presence(self.probe, self.sysfs)))


@pytest.fixture
def gpus(tmp_path: Path) -> Gpus:
    return Gpus(tmp_path)


def recorded_report() -> str:
    """The probe's own output on a real H100: fact.out without the fact's exit line."""
    lines = (FIXTURES / "fact.out").read_text().splitlines(keepends=True)
    assert lines[-1] == "gpunode-probe-exit=0\n"
    return "".join(lines[:-1])


def hotter(report: str, status: str, code: int) -> str:
    doc = json.loads(report)
    gpu = doc["gpus"][0]
    gpu["temperature_c"] += 40
    gpu["memory"]["used"] += 2**30
    gpu["memory"]["free"] -= 2**30
    gpu["power"]["draw_w"] = 612.5
    gpu["problems"] = ["temperature 75 C"] if code else []
    doc.update(status=status, exit_code=code, problems=gpu["problems"])
    return json.dumps(doc, sort_keys=True) + "\n"


def test_the_fake_probe_prints_what_the_real_one_printed(gpus: Gpus) -> None:
    gpus.installed(recorded_report(), 0)
    assert gpus.fact() == (FIXTURES / "fact.out").read_text()
    gpus.not_installed()
    gpus.add_pci("0000:00:06.0", "0x10de", "0x030200")
    assert gpus.fact() == (FIXTURES / "fact-not-installed.out").read_text()


def test_temperatures_and_health_are_not_presence(gpus: Gpus) -> None:
    gpus.installed(recorded_report(), 0)
    healthy = (gpus.fact(), gpus.projection(), gpus.sealed())
    assert healthy[1] == ""
    for status, code in (("healthy", 0), ("degraded", 1)):
        gpus.installed(hotter(recorded_report(), status, code), code)
        now = (gpus.fact(), gpus.projection(), gpus.sealed())
        assert now[0] != healthy[0]  # the fact changed ...
        assert now[1:] == healthy[1:]  # ... what the seal keeps did not


def test_no_gpu_is_presence(gpus: Gpus) -> None:
    gpus.installed(recorded_report(), 0)
    with_gpu = gpus.sealed()
    no_gpu = {**json.loads(recorded_report()), "gpus": [], "gpu_count": 0, "status": "no_gpu"}
    gpus.installed(json.dumps(no_gpu) + "\n", probe.EXIT_NO_GPU)
    assert gpus.projection() == "no-gpu\n"
    assert gpus.sealed() != with_gpu
    # an NVML error or a failed probe is not "no GPU": the same as a GPU (sees_no_gpu)
    for code in (probe.EXIT_NVML_ERROR, probe.EXIT_CHECK_FAILED):
        gpus.installed("not json\n", code)
        assert gpus.sealed() == with_gpu, code


def test_gpus_on_the_pci_bus_before_the_probe_is_installed(gpus: Gpus) -> None:
    gpus.not_installed()
    none = gpus.sealed()
    assert gpus.projection() == "gpunode-probe-exit=not-installed\n"
    gpus.add_pci("0000:00:07.0", "0x10de", "0x068000")  # an NVSwitch: not a GPU
    assert gpus.sealed() == none
    gpus.add_pci("0000:00:06.0", "0x10de", "0x030200")  # the recorded H100
    assert gpus.projection() == "pci-gpu=0000:00:06.0\ngpunode-probe-exit=not-installed\n"
    one = gpus.sealed()
    assert one != none
    gpus.add_pci("0000:00:08.0", "0x10de", "0x030200")
    assert gpus.sealed() not in (none, one)
    # and installed with a GPU is another state again
    gpus.installed(recorded_report(), 0)
    assert gpus.sealed() not in (none, one)


def test_the_projection_of_the_recorded_outputs() -> None:
    """The sed part of GPU_PRESENCE on the fact outputs recorded on the H100 host."""
    head, sep, sed = GPU_PRESENCE.rpartition(" ) | ")
    assert sep and sed.startswith("sed ")

    def project(text: str) -> str:
        return sh(f"printf %s {shlex.quote(text)} | {sed}")

    fact = (FIXTURES / "fact.out").read_text()
    assert project(fact) == ""
    assert project(fact.replace("gpunode-probe-exit=0", "gpunode-probe-exit=1")) == ""
    assert project(fact.replace("gpunode-probe-exit=0", "gpunode-probe-exit=2")) == "no-gpu\n"
    not_installed = (FIXTURES / "fact-not-installed.out").read_text()
    assert project(not_installed) == not_installed
    without = "gpunode-probe-exit=not-installed\n"
    assert project(without) == without != project(not_installed)


# --- current(): is the node's seal already this run's? ----------------------------------

IDS = ["a" * 16, "b" * 16, "c" * 16]
EXTRA = {"vault": [["secret", "gpunode/llm", 2]], "pki": [], "expires": None}
OK = {"seal": "ok", "inputs": "in", "extra": EXTRA, "ids": IDS, "differs": []}


@pytest.mark.parametrize(
    ("now", "wanted", "expected"),
    [
        (OK, set(IDS), True),
        (OK, set(IDS[:2]), True),  # the seal covers more: still current
        (OK, set(), True),
        (OK, {*IDS, "d" * 16}, False),  # a new entry
        ({**OK, "seal": "missing"}, set(IDS), False),
        ({"seal": "missing"}, set(), False),
        ({"seal": "no-checker"}, set(), False),
        ({**OK, "seal": "unreadable"}, set(IDS), False),
        ({**OK, "inputs": "other"}, set(IDS), False),
        ({**OK, "extra": {**EXTRA, "expires": 5}}, set(IDS), False),
        ({**OK, "extra": {**EXTRA, "vault": [["secret", "gpunode/llm", 3]]}}, set(IDS), False),
        ({**OK, "extra": {}}, set(IDS), False),
        ({**OK, "differs": ["sh #1"]}, set(IDS), False),
        ({**OK, "ids": None}, {"a" * 16}, False),
        ({**OK, "ids": None}, set(), True),
    ],
)
def test_current(now: dict[str, Any], wanted: set[str], expected: bool) -> None:
    assert current(now, "in", EXTRA, wanted) is expected


# --- gpunode/seal.py: inputs on the controller ------------------------------------------


def small_tree(root: Path) -> Path:
    for top in sealing.CODE_DIRS:
        (root / top / "sub").mkdir(parents=True)
        (root / top / "a.py").write_text(f"# {top}\n")
        (root / top / "sub" / "b.j2").write_text("{{ x }}\n")
    for other in ("tests", "docs", "bench"):
        (root / other).mkdir()
        (root / other / "x.py").write_text("x = 1\n")
    (root / "README.md").write_text("readme\n")
    (root / "gpunode" / "__pycache__").mkdir()
    (root / "gpunode" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\x00pyc")
    (root / "roles" / "old.pyc").write_bytes(b"\x00pyc")
    return root


def digest(root: Path) -> str:
    return str(sealing.code_digest.__wrapped__(root))  # type: ignore[attr-defined]


def test_code_dirs_cover_what_decides_a_plan() -> None:
    assert {"gpunode", "roles", "deploys", "templates"} <= set(sealing.CODE_DIRS)
    assert not {"tests", "docs", "bench"} & set(sealing.CODE_DIRS)
    assert sealing.code_digest() == digest(REPO_ROOT)


CODE_CHANGES: dict[str, Callable[[Path, str], None]] = {
    "content": lambda root, top: (root / top / "a.py").write_text(f"# {top} changed\n"),
    "content in a subfolder": lambda root, top: (root / top / "sub" / "b.j2").write_text("{{y}}"),
    "a file added": lambda root, top: (root / top / "new.py").write_text(""),
    "an empty file added deeper": lambda root, top: (root / top / "sub" / "e").write_text(""),
    "a file removed": lambda root, top: (root / top / "a.py").unlink(),
    "a file renamed": lambda root, top: (root / top / "a.py").rename(root / top / "c.py"),
}


@pytest.mark.parametrize("top", sealing.CODE_DIRS)
@pytest.mark.parametrize("change", list(CODE_CHANGES), ids=list(CODE_CHANGES))
def test_code_digest_changes_with_any_code_file(tmp_path: Path, top: str, change: str) -> None:
    root = small_tree(tmp_path)
    before = digest(root)
    assert digest(root) == before
    CODE_CHANGES[change](root, top)
    assert digest(root) != before


def test_code_digest_ignores_what_decides_no_plan(tmp_path: Path) -> None:
    root = small_tree(tmp_path)
    before = digest(root)
    for other in ("tests", "docs", "bench"):
        (root / other / "x.py").write_text("changed\n")
        (root / other / "y.py").write_text("new\n")
    (root / "README.md").write_text("changed\n")
    (root / "gpunode" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\x01changed")
    (root / "gpunode" / "__pycache__" / "b.cpython-311.pyc").write_bytes(b"new")
    (root / "roles" / "old.pyc").write_bytes(b"\x01changed")
    (root / "deploys" / "sub" / "__pycache__").mkdir()
    (root / "deploys" / "sub" / "__pycache__" / "z.pyc").write_bytes(b"new")
    (root / "templates" / "emptydir").mkdir()
    assert digest(root) == before


def hosts(*pairs: tuple[str, dict[str, Any]]) -> list[Host]:
    inventory = run.inventory_from(pairs)
    return [inventory.get_host(name) for name, _ in pairs]


DIGEST_SCRIPT = """
import json, sys
from gpunode import seal
from gpunode.commands.run import load_inventory
inventory = load_inventory(sys.argv[1])
print(json.dumps({h.name: seal.input_digest(h) for h in inventory}))
"""


@pytest.fixture
def python_inventory(tmp_path: Path) -> Path:
    """A Python inventory whose data has sets and mappings (their order varies with the
    hash seed) beside the example inventory's NodeConfig hosts."""
    path = tmp_path / "inv.py"
    path.write_text(
        "from gpunode.inventory import from_yaml\n"
        f"_gpunode = from_yaml({str(REPO_ROOT / 'inventories' / 'example.yml')!r})\n"
        "globals().update(_gpunode.pyinfra_groups())\n"
        "plain = [\n"
        "    ('@local', {'tags': {'gpu', 'h100', 'eu-west', 'canary', 'batch-7'},\n"
        "                'limits': {'b': 2, 'a': 1, 'c': frozenset({'x', 'y', 'z'})},\n"
        "                'ports': (8080, 9090)}),\n"
        "]\n"
    )
    return path


def test_input_digest_is_the_same_in_every_process(python_inventory: Path) -> None:
    here = {h.name: sealing.input_digest(h) for h in run.load_inventory(python_inventory)}
    assert set(here) == {"gpu-01", "gpu-02", "cpu-01", "@local"}
    assert len(set(here.values())) == len(here)  # one per host
    for seed in ("1", "2", "random"):
        proc = subprocess.run(
            [sys.executable, "-c", DIGEST_SCRIPT, str(python_inventory)],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO_ROOT)},
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads(proc.stdout.splitlines()[-1]) == here, seed


def test_input_digest_is_the_same_limited_or_not() -> None:
    example = REPO_ROOT / "inventories" / "example.py"
    whole = {h.name: sealing.input_digest(h) for h in run.load_inventory(example)}
    for limit in (["gpu-01"], ["h100"], ["gpu_nodes", "cpu-01"]):
        part = {h.name: sealing.input_digest(h) for h in run.load_inventory(example, limit)}
        assert part == {name: whole[name] for name in part}, limit


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ({"x": 1}, {"x": 2}),
        ({"x": 1}, {"x": "1"}),
        ({"x": 1}, {"x": 1, "y": None}),
        ({"x": [1, 2]}, {"x": [2, 1]}),
        ({"x": {"deep": {"deeper": "a"}}}, {"x": {"deep": {"deeper": "b"}}}),
        ({"tags": {"a", "b"}}, {"tags": {"a", "c"}}),
        ({"ssh_user": "root"}, {"ssh_user": "admin"}),
        ({"x": True}, {"x": 1.5}),
    ],
)
def test_input_digest_changes_with_any_data_value(
    before: dict[str, Any], after: dict[str, Any]
) -> None:
    one, two = hosts(("h1", before)), hosts(("h1", after))
    assert sealing.input_digest(one[0]) != sealing.input_digest(two[0])


def test_input_digest_changes_with_the_host_name() -> None:
    a, b = hosts(("h1", {"x": 1}), ("h2", {"x": 1}))
    assert sealing.input_digest(a) != sealing.input_digest(b)


def test_input_digest_changes_with_a_node_config_value(tmp_path: Path) -> None:
    example = (REPO_ROOT / "inventories" / "example.yml").read_text()
    assert "system_max_use: 4G" in example
    digests = []
    for text in (example, example.replace("system_max_use: 4G", "system_max_use: 5G")):
        (tmp_path / "inv.yml").write_text(text)
        (tmp_path / "inv.py").write_text(
            "from gpunode.inventory import from_yaml\n_gpunode = from_yaml(__file__)\n"
            "globals().update(_gpunode.pyinfra_groups())\n"
        )
        host = run.load_inventory(tmp_path / "inv.py").get_host("gpu-01")
        digests.append(sealing.input_digest(host))
    assert digests[0] != digests[1]


def test_input_digest_changes_with_a_data_value_of_another_type() -> None:
    """seal._plain turns a value of any type but JSON's and pydantic's into its type's
    name: a Path or an IP network in host data can change without changing the digest."""
    import ipaddress

    for before, after in (
        (Path("/srv/a"), Path("/srv/b")),
        (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.168.0.0/16")),
    ):
        one, two = hosts(("h1", {"x": before})), hosts(("h1", {"x": after}))
        assert sealing.input_digest(one[0]) != sealing.input_digest(two[0]), before


@pytest.mark.parametrize("temp_dir", ["/tmp", "/tmp/user/1000", "/var/tmp/ops"])
def test_input_digest_leaves_the_upload_staging_directory_out(temp_dir: str) -> None:
    """stage_uploads_as_login sets ``_temp_dir`` from the login's TMPDIR, which the first
    deploy changes (pam_tmpdir): where uploads are staged decides no operation's change,
    so the run after the first must not find the seal's inputs changed (found on the VMs:
    every second deploy wrote each host's seal again)."""
    bare, staged = hosts(("h1", {"x": 1})), hosts(("h1", {"x": 1, "_temp_dir": temp_dir}))
    assert sealing.input_digest(bare[0]) == sealing.input_digest(staged[0])


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ({"x": 1, "ssh_password": "one"}, {"x": 1, "ssh_password": "two"}),
        ({"x": 1}, {"x": 1, "_sudo_password": "added"}),
        ({"x": {"db_password": "a", "y": 2}}, {"x": {"db_password": "b", "y": 2}}),
        ({"x": [{"password": "a"}]}, {"x": [{"password": "b"}]}),
    ],
)
def test_input_digest_leaves_passwords_out(before: dict[str, Any], after: dict[str, Any]) -> None:
    one, two = hosts(("h1", before)), hosts(("h1", after))
    assert sealing.input_digest(one[0]) == sealing.input_digest(two[0])


def test_vault_inputs_are_noted_per_host_inside_a_host_context() -> None:
    a, b = hosts(("h1", {}), ("h2", {}))
    with ctx_host.use(None):  # another test of the run may have left a host set
        assert not ctx_host.isset()
        # outside a host context: nothing noted, nothing raised
        sealing.note_vault("secret", "gpunode/x", 1, pinned=False)
        sealing.note_pki_ca("pki", "gateway", "PEM")
        sealing.note_expiry(100.0)
    empty = {"vault": [], "pki": [], "expires": None}
    assert sealing.extra_inputs(a) == sealing.extra_inputs(b) == empty

    with ctx_host.use(a):
        sealing.note_vault("secret", "gpunode/zeta", 4, pinned=False)
        sealing.note_vault("kv", "gpunode/alpha", 2, pinned=False)
        sealing.note_vault("secret", "gpunode/pinned", 7, pinned=True)  # ignored
        sealing.note_pki_ca("pki_int", "gateway", "-----BEGIN CERTIFICATE-----\nB\n")
        sealing.note_pki_ca("pki", "gateway", "-----BEGIN CERTIFICATE-----\nA\n")
        sealing.note_expiry(2000.9)
        sealing.note_expiry(1500.2)  # the earliest is kept
        sealing.note_expiry(1800)
    with ctx_host.use(b):
        sealing.note_expiry(99.0)

    ca = {
        p: hashlib.sha256(f"-----BEGIN CERTIFICATE-----\n{p}\n".encode()).hexdigest() for p in "AB"
    }
    assert sealing.extra_inputs(a) == {
        "vault": [["kv", "gpunode/alpha", 2], ["secret", "gpunode/zeta", 4]],
        "pki": [["pki", "gateway", ca["A"]], ["pki_int", "gateway", ca["B"]]],
        "expires": 1500,
    }
    assert sealing.extra_inputs(b) == {**empty, "expires": 99}
    # JSON-stable: what the node keeps and prints back compares equal (current())
    for host in (a, b):
        extra = sealing.extra_inputs(host)
        assert json.loads(json.dumps(extra)) == extra
        assert json.dumps(extra, sort_keys=True) == json.dumps(
            sealing.extra_inputs(host), sort_keys=True
        )


def test_extra_inputs_do_not_depend_on_the_order_noted() -> None:
    a, b = hosts(("h1", {}), ("h2", {}))
    notes = [("secret", f"gpunode/s{i}", i) for i in range(6)]
    with ctx_host.use(a):
        for mount, path, version in notes:
            sealing.note_vault(mount, path, version, pinned=False)
            sealing.note_pki_ca(mount, path, path)
    with ctx_host.use(b):
        for mount, path, version in reversed(notes):
            sealing.note_pki_ca(mount, path, path)
            sealing.note_vault(mount, path, version, pinned=False)
    assert json.dumps(sealing.extra_inputs(a)) == json.dumps(sealing.extra_inputs(b))


def test_the_spec_is_what_record_reads(
    tmp_path: Path, seal_path: Path, node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    [host] = hosts(("h1", {"x": 1}))
    with ctx_host.use(host):
        sealing.note_vault("secret", "gpunode/llm", 3, pinned=False)
        sealing.note_expiry(1900000000.5)
    spec = write_spec(tmp_path / "spec.json", sealing.spec(host, node.entries()))
    assert sealcheck.record(str(spec)) == 0
    doc, _ = check(capsys)
    assert (doc["seal"], doc["differs"]) == ("ok", [])
    # what the seal operation compares: the same run's seal is current
    ids = {sealing.entry_id(k, a) for k, a in node.entries()}
    assert current(doc, sealing.input_digest(host), sealing.extra_inputs(host), ids)
    # and judge() proves it (the Vault input left out: this host has no Vault to ask)
    assert judge(host, {**doc, "extra": {**doc["extra"], "vault": []}}).proven


# --- gpunode/commands/drift.py: shards and the verdict ----------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0/1", (0, 1)),
        ("3/4", (3, 4)),
        ("0/100000", (0, 100000)),
        ("99999/100000", (99999, 100000)),
    ],
)
def test_parse_shard_accepts(text: str, expected: tuple[int, int]) -> None:
    assert drift.parse_shard(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "4/4",
        "5/4",
        "-1/4",
        "1/-4",
        "a/b",
        "1/0",
        "0/0",
        "1/100001",
        " 1/4",
        "1/4 ",
        "1 /4",
        "",
        "1",
        "1/",
        "/4",
        "1/2/3",
        "1.0/4",
        "+1/4",
        "0x1/4",
        "1/4\n",
        "²/4",  # str.isdigit() says yes, int() says no
        "0/²",
    ],
)
def test_parse_shard_refuses(text: str) -> None:
    with pytest.raises(drift.DriftError, match=r"allowed: I/N with 0 <= I < N <= 100000"):
        drift.parse_shard(text)


@pytest.mark.parametrize("text", ["4/4", "²/4"])
def test_a_bad_shard_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    deploy = tmp_path / "noop.py"
    deploy.write_text("")
    inventory = tmp_path / "inv.py"
    inventory.write_text("nodes = [('@local', {})]\n")
    code = drift.main(str(inventory), str(deploy), shard=text)
    out, err = capsys.readouterr()
    assert code == drift.EXIT_ERROR
    allowed = "(allowed: I/N with 0 <= I < N <= 100000, e.g. 0/4)"
    assert err == f"gpunode drift: --shard {text}: not a shard {allowed}\n"


NAMES = [f"gpu-{i:05d}.dc{i % 7}.example.com" for i in range(2000)]


@pytest.mark.parametrize("count", [1, 3, 8])
def test_each_host_is_in_exactly_one_shard(count: int) -> None:
    shards = {name: [i for i in range(count) if drift.in_shard(name, i, count)] for name in NAMES}
    assert all(len(found) == 1 for found in shards.values())
    # stable: the same again, in another order and another call
    again = {
        name: [i for i in range(count) if drift.in_shard(name, i, count)]
        for name in reversed(NAMES)
    }
    assert again == shards
    sizes = [sum(found == [i] for found in shards.values()) for i in range(count)]
    assert all(len(NAMES) / count * 0.75 < size < len(NAMES) / count * 1.25 for size in sizes)


def test_the_split_is_the_documented_one() -> None:
    """By SHA-256 of the name: another scheduler (docs/fleet.md) may compute it itself, and
    a change would move hosts between the runs of a fleet."""
    for name in ("gpu-01", "gpu-02", "cpu-01", "ü-node", ""):
        value = int(hashlib.sha256(name.encode()).hexdigest()[:16], 16)
        for count in (1, 2, 5, 16, 100000):
            assert drift.in_shard(name, value % count, count)
    assert [drift.in_shard("gpu-01", i, 4) for i in range(4)] == [False, False, True, False]


class FakeData:
    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def dict(self) -> dict[str, Any]:
        return dict(self._data)

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)


class FakeHost:
    """A host without a gpunode config: judge() must not reach Vault for it."""

    def __init__(self, name: str, data: dict[str, Any]) -> None:
        self.name = name
        self.data = FakeData(data)


@pytest.fixture
def judged() -> FakeHost:
    return FakeHost("gpu-07", {"x": 1, "ports": [1, 2]})


def sealed_ok(host: Any, **changes: Any) -> dict[str, Any]:
    return {
        "seal": "ok",
        "inputs": sealing.input_digest(host),
        "extra": {"vault": [], "pki": [], "expires": None},
        "ids": IDS,
        "differs": [],
        **changes,
    }


def test_a_fake_host_digests_like_a_real_one(judged: FakeHost) -> None:
    [real] = hosts(("gpu-07", {"x": 1, "ports": [1, 2]}))
    assert sealing.input_digest(judged) == sealing.input_digest(real)


def test_judge_proves_a_clean_seal(judged: FakeHost) -> None:
    verdict = judge(judged, sealed_ok(judged))
    assert (verdict.proven, verdict.reason, verdict.entries) == (True, "", len(IDS))
    future = sealed_ok(judged, extra={"vault": [], "pki": [], "expires": time.time() + 3600})
    assert judge(judged, future).proven
    no_extra = sealed_ok(judged, extra=None, ids=[])
    assert (judge(judged, no_extra).proven, judge(judged, no_extra).entries) == (
        True,
        0,
    )


@pytest.mark.parametrize(
    ("now", "reason"),
    [
        ({"seal": "missing"}, "seal missing"),
        ({"seal": "no-checker"}, "seal no-checker"),
        ({"seal": "unreadable"}, "seal unreadable"),
        ({}, "seal unreadable"),
    ],
)
def test_judge_without_a_seal(judged: FakeHost, now: dict[str, Any], reason: str) -> None:
    verdict = judge(judged, now)
    assert (verdict.proven, verdict.reason) == (False, reason)


def test_judge_other_inputs(judged: FakeHost) -> None:
    other = FakeHost("gpu-07", {"x": 2, "ports": [1, 2]})
    for now in (sealed_ok(other), sealed_ok(judged, inputs=None), sealed_ok(judged, inputs="")):
        verdict = judge(judged, now)
        assert (verdict.proven, verdict.reason) == (
            False,
            "the code or the host's inventory data changed",
        )


def test_judge_an_expired_seal(judged: FakeHost) -> None:
    for expires in (time.time() - 1, 0, int(time.time())):
        now = sealed_ok(judged, extra={"vault": [], "pki": [], "expires": expires})
        verdict = judge(judged, now)
        assert (verdict.proven, verdict.reason) == (False, "a certificate is due for renewal")


@pytest.mark.parametrize(
    ("differs", "reason"),
    [
        (["path /etc/x"], "differs: path /etc/x"),
        ([f"sh #{i}" for i in range(5)], "differs: sh #0, sh #1, sh #2, sh #3, sh #4"),
        ([f"sh #{i}" for i in range(6)], "differs: sh #0, sh #1, sh #2, sh #3, sh #4 and 1 more"),
        (
            [f"path /p{i}" for i in range(40)],
            "differs: path /p0, path /p1, path /p2, path /p3, path /p4 and 35 more",
        ),
    ],
)
def test_judge_what_differs(judged: FakeHost, differs: list[str], reason: str) -> None:
    verdict = judge(judged, sealed_ok(judged, differs=differs))
    assert (verdict.proven, verdict.reason) == (False, reason)


def test_the_seal_switch_off_proves_nothing(
    judged: FakeHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(seal_facts.SEAL_SWITCH, "0")
    verdict = proven(judged)  # type: ignore[arg-type]  # never reaches the host
    assert (verdict.proven, verdict.reason) == (False, "GPUNODE_SEAL=0")


def test_vault_reason_without_vault_inputs_asks_nobody(judged: FakeHost) -> None:
    # FakeHost has no gpunode config: reaching Vault would raise (node_config)
    for extra in ({}, {"vault": [], "pki": []}, {"vault": None, "pki": None, "expires": 5}):
        assert vault_reason(judged, extra) == ""
    with pytest.raises(Exception, match="no gpunode config"):
        vault_reason(judged, {"vault": [["secret", "gpunode/x", 1]]})


@pytest.fixture
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from harness import start_bao, stop_bao

    from gpunode.clients import vault

    vault.close_all()  # no session left by an earlier test of the run
    server = start_bao(tmp_path_factory.mktemp("bao-seal"))
    try:
        yield server
    finally:
        stop_bao(server)
        vault.close_all()


def test_vault_reason_against_a_real_openbao(
    bao: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = bao.client()
    client.secrets.kv.v2.create_or_update_secret("gpunode/llm", {"api_key": "v1"})
    client.sys.enable_secrets_engine("pki", path="pki")
    client.secrets.pki.generate_root("internal", "gpunode test CA", mount_point="pki")
    client.secrets.pki.create_or_update_role(
        "gateway", {"allow_any_name": True, "max_ttl": "24h"}, mount_point="pki"
    )
    ca_pem = client.secrets.pki.read_ca_certificate(mount_point="pki")
    env = "GPUNODE_SEAL_TEST_TOKEN"
    monkeypatch.setenv(env, bao.root)
    (tmp_path / "inv.yml").write_text(
        json.dumps(
            {
                "defaults": {
                    "distro": "debian12",
                    "firewall": {"enabled": False},
                    "vault": {"addr": bao.addr, "auth": "token", "token_env": env},
                },
                "hosts": {"n1": {"connection": {"address": "192.0.2.10"}}},
            }
        )
    )
    (tmp_path / "inv.py").write_text(
        "from gpunode.inventory import from_yaml\n_gpunode = from_yaml(__file__)\n"
        "globals().update(_gpunode.pyinfra_groups())\n"
    )
    host = run.load_inventory(tmp_path / "inv.py").get_host("n1")
    ca = hashlib.sha256(ca_pem.encode()).hexdigest()
    extra = {"vault": [["secret", "gpunode/llm", 1]], "pki": [["pki", "gateway", ca]]}
    assert vault_reason(host, extra) == ""
    assert judge(host, sealed_ok(host, extra=extra)).proven

    other_ca = {**extra, "pki": [["pki", "gateway", "0" * 64]]}
    assert vault_reason(host, other_ca) == "another CA behind pki/gateway"
    assert vault_reason(host, {**other_ca, "vault": []}) == "another CA behind pki/gateway"

    client.secrets.kv.v2.create_or_update_secret("gpunode/llm", {"api_key": "v2"})
    reason = "a newer version of secret/gpunode/llm in Vault"
    assert vault_reason(host, extra) == reason
    verdict = judge(host, sealed_ok(host, extra=extra))
    assert (verdict.proven, verdict.reason) == (False, reason)
    moved = {**extra, "vault": [["secret", "gpunode/llm", 2]]}
    assert vault_reason(host, moved) == ""
    assert "v2" not in repr(verdict) and bao.root not in repr(verdict)


# --- fact reads the seal cannot take ------------------------------------------------------

AS_ANOTHER_USER = """
from gpunode import pipeline
pipeline.install()

from pyinfra import host
from pyinfra.facts.server import Command

assert host.get_fact(Command, "id -un") == "root"
assert host.get_fact(Command, "id -un", _su_user="nobody", _su_shell="/bin/sh") == "nobody"
"""


def test_a_fact_read_as_another_user_is_not_sealed(tmp_path: Path) -> None:
    """docs/performance.md: a fact read as another user cannot be sealed (the seal is
    removed). FactRead keeps no executor arguments: the read as nobody is the same FactRead
    as the read as root (batchable), and entries() seals a command gpunode-seal runs as root."""
    need_root("su to another user")
    deploy = tmp_path / "as_user.py"
    deploy.write_text(AS_ANOTHER_USER)
    with run.prepare(run.inventory_from([("@local", {})]), deploy) as planned:
        assert planned.errors == {}
        reads = pipeline.fact_reads(planned.host("@local"))
    assert reads  # both reads ran (as root, then as nobody) ...
    assert entries(reads) is None  # ... and the second cannot be sealed
