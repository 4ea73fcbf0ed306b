"""Lock files with hashes (gpunode/locks.py, locks/, scripts/lock.py): the format is parsed
and checked, a pin without a lock is refused at config load, real pip refuses a file whose
hash the lock does not list (from a wheelhouse folder and from a real index on 127.0.0.1),
the controller's wheelhouse is checked wheel by wheel, and the inference role installs a
pip runtime only with ``--require-hashes`` from its uploaded lock.

The wheel pip installs here is built by the test (a wheel is a zip file: PEP 427).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import http.server
import os
import re
import shlex
import subprocess
import sys
import threading
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import FIXTURES, Run, host_info_output, run_deploys, run_sh
from packaging.requirements import Requirement
from pyinfra.facts.server import Os

from gpunode import locks
from gpunode.config import load
from gpunode.facts.nvidia import NvidiaGpuMinors
from gpunode.facts.server import HostInfo
from gpunode.inference import VENV_DIR
from gpunode.paths import REPO_ROOT
from gpunode.schema.node import NodeConfig
from gpunode.schema.runtimes import PROFILES
from gpunode.schema.types import ConfigError
from roles.inference_systemd import inference_systemd

HOST = "gpu-01"
VLLM = "vllm==0.6.6.post1"  # locks/runtimes/vllm-0.6.6.post1.txt
GPU = "GPU-9221d5d1-b60b-a624-bf14-0a1819cfda3b"
H1, H2 = "a1" * 32, "b2" * 32


# --- the format ---------------------------------------------------------------------------


def test_the_shipped_locks_parse_and_hold_what_they_are_named_for() -> None:
    controller = locks.read(locks.CONTROLLER_LOCK)
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    for dependency in project["project"]["dependencies"]:
        req = Requirement(dependency)
        entry = controller.entries[locks.canonical(req.name)]
        assert req.specifier.contains(entry.version), (dependency, entry.version)
    runtime_locks = sorted(locks.RUNTIME_LOCKS.glob("*.txt"))
    assert runtime_locks
    for path in runtime_locks:
        lock = locks.read(path)
        pins = [f"{e.name}=={e.version}" for e in lock.entries.values()]
        # the file name is the pins it was made for, and the lock holds them
        named = [p for p in pins if locks.runtime_lock_name([p]) in path.name.split("+")[0]]
        assert named and not lock.unpinned(named), path


def test_a_lock_is_entries_with_hashes_over_continued_lines() -> None:
    text = (
        "# made by scripts/lock.py\n"
        f"Zope.Interface==8.7 \\\n    --hash=sha256:{H1} \\\n    --hash=sha256:{H2}\n"
        "    # via gevent\n"
        f"pyyaml==6.0.4 --hash=sha256:{H1}\n"
    )
    lock = locks.parse(text, "x.txt")
    assert lock.entries["zope-interface"] == locks.Entry(
        "zope-interface", "8.7", frozenset({H1, H2})
    )
    assert lock.entries["pyyaml"].hashes == {H1}
    assert lock.missing({"zope.interface": ["8.7"], "PyYAML": ["6.0.3"]}) == ["pyyaml==6.0.4"]
    assert lock.unpinned(["pyyaml==6.0.4", "zope_interface[x]==8.7", "pyyaml==6"]) == ["pyyaml==6"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pyyaml==6.0.4\n", "line 1: not a locked requirement"),
        (f"pyyaml>=6 --hash=sha256:{H1}\n", "not a locked requirement"),
        (f"pyyaml==6 --hash=md5:{H1[:32]}\n", "not a locked requirement"),
        (f"pyyaml==6 --hash=sha256:{H1[:63]}\n", "not a locked requirement"),
        (f"pyyaml==6 --hash=sha256:{H1.upper()}\n", "not a locked requirement"),
        (f"-r other.txt\npyyaml==6 --hash=sha256:{H1}\n", "line 1: not a locked requirement"),
        (f"--index-url http://evil.example/simple\nx==1 --hash=sha256:{H1}\n", "line 1:"),
        (f"--extra-index-url=http://evil/\nx==1 --hash=sha256:{H1}\n", "line 1:"),
        (f"x @ https://evil.example/x.whl --hash=sha256:{H1}\n", "not a locked requirement"),
        (f"x==1 ; python_version < '3' --hash=sha256:{H1}\n", "not a locked requirement"),
        (f"x[extra]==1 --hash=sha256:{H1}\n", "not a locked requirement"),
        (f"x==1 --hash=sha256:{H1} # $(id)\n", "not a locked requirement"),
        (f"x==${{VERSION}} --hash=sha256:{H1}\n", "not a locked requirement"),
        (f"x==1 --hash=sha256:{H1} --no-binary :all:\n", "not a locked requirement"),
        (f"x==1 \\\n# comment\n --hash=sha256:{H1}\n", "line 1:"),
        (f"x==1 --hash=sha256:{H1} \\", "ends with a continuation"),
        (f"x==1 --hash=sha256:{H1}\nX==2 --hash=sha256:{H2}\n", "line 2: x is locked twice"),
        (f"x==1\r --hash=sha256:{H1}\n", "line 1: control or non-ASCII character '\\r'"),
        (f"x==1\x00 --hash=sha256:{H1}\n", "control or non-ASCII character"),
        (f"x\u2028==1 --hash=sha256:{H1}\n", "control or non-ASCII character"),
        ("# nothing\n\n", "no locked requirement"),
    ],
)
def test_anything_else_is_refused_naming_the_file_and_line(text: str, expected: str) -> None:
    with pytest.raises(locks.LockError) as exc:
        locks.parse(text, "/srv/x.lock")
    assert str(exc.value).startswith("/srv/x.lock"), exc.value
    assert expected in str(exc.value)
    assert "(allowed: " in str(exc.value)


def test_a_file_that_is_no_lock_is_refused_without_showing_its_content(tmp_path: Path) -> None:
    """``lock:`` names a file on the deploying machine: one that is not a lock (a key, a
    secret_id) must not reach the output through the error message."""
    secret = tmp_path / "secret_id"
    secret.write_text("CANARY-3b1f9e0c-secret-id-value\n")
    with pytest.raises(locks.LockError) as exc:
        locks.read(secret)
    assert "CANARY" not in str(exc.value) and "3b1f9e0c" not in str(exc.value)
    allowed = f"(allowed: {locks.LINE_FORMAT}, or a # comment)"
    assert str(exc.value) == f"{secret} line 1: not a locked requirement {allowed}"


def test_a_lock_file_that_is_not_text_or_too_big_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bin").write_bytes(b"\xff\xfe" + b"x==1\n")
    (tmp_path / "big").write_bytes(b"#" * (locks.MAX_BYTES + 1))
    os.mkfifo(tmp_path / "fifo")  # reading it would wait for a writer forever
    for name, expected in (
        ("bin", "not ASCII"),
        ("big", "larger than"),
        ("no", "cannot be read"),
        ("fifo", "not a regular file"),
    ):
        with pytest.raises(locks.LockError, match=expected):
            locks.read(tmp_path / name)
    with pytest.raises(locks.LockError, match="not a regular file"):
        locks.read("/dev/zero")


def test_runtime_lock_names_come_from_the_pins() -> None:
    assert locks.runtime_lock_name([VLLM]) == "vllm-0.6.6.post1.txt"
    assert locks.runtime_lock_name(["Zope_Interface[B,a]==8.7", "vllm==1"]) == (
        "vllm-1+zope-interface[a,b]-8.7.txt"
    )


# --- real pip refuses a file whose hash the lock does not list ---------------------------


def make_wheel(
    folder: Path, name: str = "gpunode_tiny", version: str = "1.0", requires: str = ""
) -> Path:
    """A real, minimal pure-Python wheel (PEP 427): one module, METADATA, WHEEL, RECORD."""
    dist = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += f"Requires-Dist: {requires}\n" if requires else ""
    files = {
        f"{name}.py": b"VALUE = 42\n",
        f"{dist}/METADATA": metadata.encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    files[f"{dist}/RECORD"] = ("\n".join([*record, f"{dist}/RECORD,,"]) + "\n").encode()
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    write_zip(wheel, files)
    return wheel


def write_zip(path: Path, members: dict[str, bytes]) -> None:
    """Byte for byte the same on every call (fixed member times)."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real venv; its ``bin/pip`` runs this interpreter's pip on it (``pip --python``), so
    the test does not spend half a minute in ensurepip."""
    path = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    pip = path / "bin" / "pip"
    pip.write_text(
        f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m pip --python {path}/bin/python "$@"\n'
    )
    pip.chmod(0o755)
    return path


def pip_env() -> dict[str, str]:
    """No pip configuration of this machine (its extra indexes, find-links, constraints)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull}


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A real PEP 503 simple index on 127.0.0.1 serving one wheel: (its URL, the wheel)."""
    root = tmp_path_factory.mktemp("index")
    project = root / "simple" / "gpunode-tiny"
    project.mkdir(parents=True)
    wheel = make_wheel(project)
    (project / "index.html").write_text(f'<a href="{wheel.name}">{wheel.name}</a>\n')

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/simple/", wheel
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("source", ["wheelhouse", "index"])
def test_real_pip_installs_only_the_file_the_lock_hashes(
    source: str, venv: Path, index: tuple[str, Path], tmp_path: Path
) -> None:
    """The command gpunode runs (controller: --no-index --find-links the uploaded wheelhouse;
    runtimes: --index-url), run by real pip in a real venv: a lock whose hash is not the
    served file's fails the install and installs nothing; the right hash installs it."""
    url, served = index
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    make_wheel(wheelhouse)
    good = hashlib.sha256(served.read_bytes()).hexdigest()
    assert good == hashlib.sha256((wheelhouse / served.name).read_bytes()).hexdigest()
    where = {"find_links": str(wheelhouse)} if source == "wheelhouse" else {"index_url": url}
    pip = str(venv / "bin" / "pip")
    python = str(venv / "bin" / "python")
    uninstall = [pip, "uninstall", "-y", "-q", "gpunode-tiny"]
    subprocess.run(uninstall, env=pip_env(), capture_output=True, check=False)

    def install(digest: str) -> subprocess.CompletedProcess[str]:
        lock = tmp_path / f"lock-{digest[:8]}.txt"
        lock.write_text(f"gpunode-tiny==1.0 \\\n    --hash=sha256:{digest}\n")
        locks.parse(lock.read_text(), str(lock))  # what gpunode accepts
        command = locks.install_command(pip, str(lock), **where)
        return subprocess.run(
            ["sh", "-c", command], capture_output=True, text=True, env=pip_env(), timeout=120
        )

    bad = install(hashlib.sha256(b"another file").hexdigest())
    assert bad.returncode != 0
    assert "DO NOT MATCH THE HASHES" in bad.stderr, bad.stderr
    assert good in bad.stderr  # pip names the file's real digest
    assert subprocess.run([python, "-c", "import gpunode_tiny"], capture_output=True).returncode

    ok = install(good)
    assert ok.returncode == 0, ok.stderr
    out = subprocess.run([python, "-c", "import gpunode_tiny; print(gpunode_tiny.VALUE)"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout == "42\n"


def test_real_pip_refuses_a_dependency_the_lock_does_not_hold(venv: Path, tmp_path: Path) -> None:
    """A lock is fully resolved: pip resolves nothing itself, a dependency missing from the
    lock stops the install."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    wheel = make_wheel(folder, "gpunode_needs", requires="gpunode-tiny")
    make_wheel(folder)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    lock = tmp_path / "lock.txt"
    lock.write_text(f"gpunode-needs==1.0 --hash=sha256:{digest}\n")
    pip = str(venv / "bin" / "pip")
    uninstall = [pip, "uninstall", "-y", "-q", "gpunode-tiny"]
    subprocess.run(uninstall, env=pip_env(), capture_output=True, check=False)
    command = locks.install_command(pip, str(lock), find_links=str(folder))
    proc = subprocess.run(["sh", "-c", command], capture_output=True, text=True, env=pip_env())
    assert proc.returncode != 0
    assert "In --require-hashes mode, all requirements must have their versions pinned" in (
        proc.stderr
    )
    assert "gpunode-tiny" in proc.stderr


def test_the_install_command_quotes_every_value() -> None:
    command = locks.install_command(
        "/opt/gpunode/venvs/vllm-0/bin/pip",
        "/opt/gpunode/venvs/vllm-0.lock.txt",
        index_url="https://pypi.internal/simple?a=1&b=$(id)",
    )
    argv = shlex.split(command)
    assert argv[argv.index("--index-url") + 1] == "https://pypi.internal/simple?a=1&b=$(id)"
    assert "'https://pypi.internal/simple?a=1&b=$(id)'" in command
    assert argv[-2:] == ["-r", "/opt/gpunode/venvs/vllm-0.lock.txt"]
    assert {"--require-hashes", "--only-binary=:all:"} <= set(argv)


# --- the controller's wheelhouse ------------------------------------------------------------


def test_the_wheelhouse_is_checked_wheel_by_wheel(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path)
    data = wheel.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    lock = locks.parse(
        f"gpunode-tiny==1.0 --hash=sha256:{digest}\nother==2 --hash=sha256:{H1}\n", "c.txt"
    )
    other = "other-2-py3-none-any.whl"
    assert locks.check_wheels(lock, {wheel.name: data, other: b"x"}) == [
        f"{other}: sha256 {hashlib.sha256(b'x').hexdigest()} is not one c.txt lists for "
        "other==2 (a file that is not the one locked)"
    ]
    tampered = data + b"\0"
    problems = locks.check_wheels(
        lock, {wheel.name: tampered, "extra-1-py3-none-any.whl": b"", "bad.tar.gz": b""}
    )
    assert problems == [
        "'bad.tar.gz' is not a wheel file name (allowed: PEP 427 names)",
        "extra-1-py3-none-any.whl: not in c.txt (locked: not at all)",
        f"{wheel.name}: sha256 {hashlib.sha256(tampered).hexdigest()} is not one c.txt "
        "lists for gpunode-tiny==1.0 (a file that is not the one locked)",
        "other==2: no wheel for it",
    ]
    assert locks.check_wheels(lock, {wheel.name: data}) == ["other==2: no wheel for it"]


# --- runtimes: config load and the role -----------------------------------------------------


def node(runtime: dict[str, Any]) -> dict[str, Any]:
    return {
        "distro": "debian12",
        "firewall": {"enabled": False},  # the firewall role's concern, not these tests'
        "inference": {
            "runtimes": {"vllm": runtime},
            "services": {
                "big": {
                    "runtime": "vllm",
                    "port": 8000,
                    "gpus": [GPU],
                    "model": {"uri": "file:///mnt/models/m.tar", "sha256": "c" * 64,
                              "format": "tar"},
                }
            },
        },
    }  # fmt: skip


def load_node(data: dict[str, Any]) -> NodeConfig:
    raw = {"defaults": data, "hosts": {HOST: {"connection": {"address": "192.0.2.10"}}}}
    return load(copy.deepcopy(raw), source="inv.yml").hosts[HOST].config


def refused(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as exc:
        load_node(data)
    message = str(exc.value)
    assert message.startswith(
        (
            "inv.yml: host gpu-01: inference.runtimes.vllm",
            "inv.yml: defaults: inference.runtimes.vllm",
        )
    ), message
    assert "(allowed: " in message
    return message


def test_a_pin_without_a_lock_is_refused_at_load_saying_how_to_make_one() -> None:
    message = refused(node({"method": "pip", "packages": ["vllm==0.6.3"]}))
    assert "inference.runtimes.vllm.packages: no lock for vllm==0.6.3" in message
    assert "locks/runtimes/vllm-0.6.3.txt" in message
    assert "python scripts/lock.py runtime vllm==0.6.3" in message
    assert "inference.runtimes.vllm.lock" in message


def test_an_inventory_may_name_its_own_lock_which_is_checked(tmp_path: Path) -> None:
    own = tmp_path / "vllm.lock"
    own.write_text(f"vllm==0.6.3 --hash=sha256:{H1}\ntorch==2.4.0 --hash=sha256:{H2}\n")
    config = load_node(node({"method": "pip", "packages": ["vllm==0.6.3"], "lock": str(own)}))
    assert config.inference.runtimes["vllm"].lock == str(own)

    gone = refused(node({"method": "pip", "packages": [VLLM], "lock": str(tmp_path / "no")}))
    assert f"inference.runtimes.vllm.lock: {tmp_path}/no: cannot be read" in gone
    other = refused(node({"method": "pip", "packages": [VLLM], "lock": str(own)}))
    assert f"inference.runtimes.vllm.packages: {VLLM} not in the lock {own}" in other
    own.write_text("vllm==0.6.3\n")
    bad = refused(node({"method": "pip", "packages": ["vllm==0.6.3"], "lock": str(own)}))
    assert f"{own} line 1: not a locked requirement" in bad
    tarball = {"uri": "http://m.internal/v.tar", "sha256": H1, "format": "tar"}
    art = {"method": "artifact", "lock": str(own), "artifact": tarball}
    assert "lock is for method pip (allowed: unset it)" in refused(node(art))


def freeze_handler(lock: locks.Lock, drop: str | None = None):
    """The PipPackages fact on a venv that holds the lock (``pip freeze --all``)."""
    lines = [f"{e.name}=={e.version}" for e in lock.entries.values() if e.name != drop]

    def handler(command: str) -> list[str] | None:
        return lines + ["pip==23.0.1"] if re.search(r"/bin/pip freeze --all", command) else None

    return handler


def minors_output() -> list[str]:
    """The GPU-minor fact's real command over an H100's recorded driver file (as in
    test_inference.py)."""
    command = NvidiaGpuMinors().command()
    fixture = shlex.quote(str(FIXTURES / "nvidia-proc" / "h100-information"))
    out = run_sh(command.replace("/proc/driver/nvidia/gpus/*/information", fixture))
    assert out["success"]
    return out["stdout"].splitlines()


def run_role(config: NodeConfig, handlers: tuple = ()) -> Run:
    responses: dict[Any, Any] = {
        HostInfo().command(): list(host_info_output("debian12")),
        Os().command(): "Linux",
        "command -v useradd || true": "/usr/sbin/useradd",
        NvidiaGpuMinors().command(): minors_output(),
    }
    return run_deploys(config, responses, [inference_systemd], handlers, host_name=HOST)


def installs(run: Run) -> list[str]:
    return [c for c in run.commands if re.search(r"/bin/pip'? install", c)]


def test_the_role_uploads_the_lock_and_installs_only_with_require_hashes() -> None:
    config = load_node(node({"method": "pip", "packages": [VLLM],
                             "index_url": "https://pypi.internal/simple"}))  # fmt: skip
    lock = locks.read(locks.RUNTIME_LOCKS / "vllm-0.6.6.post1.txt")
    run = run_role(config)
    (lock_path,) = [p for p, _ in run.uploads if p.endswith(".lock.txt")]
    assert re.fullmatch(rf"{VENV_DIR}/vllm-[0-9a-f]{{12}}\.lock\.txt", lock_path)
    assert run.files[lock_path] == lock.text
    venv = lock_path.removesuffix(".lock.txt")
    (command,) = installs(run)
    assert command == locks.install_command(
        f"{venv}/bin/pip", lock_path, "https://pypi.internal/simple"
    )
    argv = shlex.split(command)
    assert argv[:2] == [f"{venv}/bin/pip", "install"]
    assert {"--require-hashes", "--only-binary=:all:"} <= set(argv)
    assert argv[-2:] == ["-r", lock_path]
    assert VLLM not in command  # the pins reach pip only through the uploaded lock
    unit = run.files["/etc/systemd/system/gpunode-inference-big.service"]
    assert f"{venv}/{PROFILES['vllm'].executable['pip']} " in unit


def test_a_converged_venv_gets_no_install_and_a_drifted_one_is_reinstalled() -> None:
    config = load_node(node({"method": "pip", "packages": [VLLM]}))
    lock = locks.read(locks.RUNTIME_LOCKS / "vllm-0.6.6.post1.txt")
    assert installs(run_role(config, (freeze_handler(lock),))) == []
    drifted = run_role(config, (freeze_handler(lock, drop="torch"),))
    assert len(installs(drifted)) == 1 and "--require-hashes" in installs(drifted)[0]


def test_a_new_lock_gives_a_new_venv(tmp_path: Path) -> None:
    shipped = locks.RUNTIME_LOCKS / "vllm-0.6.6.post1.txt"
    own = tmp_path / "vllm.lock"
    own.write_text(shipped.read_text() + "# regenerated\n")
    first = run_role(load_node(node({"method": "pip", "packages": [VLLM]})))
    second = run_role(load_node(node({"method": "pip", "packages": [VLLM], "lock": str(own)})))
    paths = [[p for p, _ in r.uploads if p.endswith(".lock.txt")][0] for r in (first, second)]
    assert paths[0] != paths[1]


def test_a_venv_made_under_umask_027_is_readable_by_its_service(venv: Path, tmp_path: Path) -> None:
    """pam_umask gives gpunode's own session login.defs' UMASK (027 by default) on Ubuntu: the
    role's fix-up after a new venv or install leaves every file readable (and directories and
    programs enterable/runnable) by the service user, nothing writable by it."""
    config = load_node(node({"method": "pip", "packages": [VLLM]}))
    run = run_role(config)
    (lock_path,) = [p for p, _ in run.uploads if p.endswith(".lock.txt")]
    made = lock_path.removesuffix(".lock.txt")
    (fixup,) = [c for c in run.commands if c.startswith("chmod -R ")]
    assert run.commands.index(fixup) > run.commands.index(installs(run)[0])
    tree = tmp_path / "venv"
    subprocess.run(
        ["sh", "-c", f"umask 027 && {sys.executable} -m venv --without-pip {tree}"], check=True
    )
    assert (tree.stat().st_mode & 0o777) == 0o750  # what the service user could not enter
    subprocess.run(["sh", "-c", fixup.replace(made, str(tree))], check=True)
    for path in [tree, *tree.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode & 0o777
        assert mode & 0o044 == 0o044 and not mode & 0o022, (path, oct(mode))
        if path.is_dir() or mode & 0o100:
            assert mode & 0o011 == 0o011, (path, oct(mode))
    # converged: no install, so no fix-up either
    lock = locks.read(locks.RUNTIME_LOCKS / "vllm-0.6.6.post1.txt")
    activate = f"{made}/bin/activate"

    def venv_exists(command: str) -> list[str] | None:  # the File fact's `stat` of activate
        if "stat " in command and activate in command:
            stat = "user=root group=root mode=-rw-r--r-- atime=1 mtime=1 ctime=1 size=9"
            return [f"{stat} '{activate}'"]
        return None

    again = run_role(config, (freeze_handler(lock), venv_exists))
    assert not [c for c in again.commands if "-m venv" in c or "virtualenv" in c]
    assert not [c for c in again.commands if c.startswith("chmod -R ")]
