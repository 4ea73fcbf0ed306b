"""The PythonBytecode fact and the python_bytecode operation, for real: the fact's command
and the operation's commands run under this machine's /bin/sh and system python3 on a
module in a temporary folder, and the module is then imported the way the GPU probe imports
pynvml (no bytecode written), to see which file Python loaded."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from harness import need_root, run_deploys

from gpunode.config import load
from gpunode.facts.server import PythonBytecode
from gpunode.operations.server import bytecode_path_of, python_bytecode

PYTHON = "/usr/bin/python3"
TIMEOUT = 60


@pytest.fixture(autouse=True)
def _system_python() -> None:
    if not Path(PYTHON).exists() or shutil.which("python3", path="/usr/bin:/bin") is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{PYTHON} missing and CI=true")
        pytest.skip(f"{PYTHON} missing")


def sh(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/sh", "-c", command],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL,
        timeout=TIMEOUT,
    )


def fact(path: Path) -> dict[str, str]:
    done = sh(PythonBytecode().command(path=str(path)))
    assert done.returncode == 0, done.stderr
    return PythonBytecode().process(done.stdout.splitlines())


def apply(path: Path, content: bytes | None = None) -> list[str]:
    """The operation planned against the real fact (the fake host answers it by running it
    here), then its commands run here, in order; returns them."""
    source = content if content is not None else path.read_bytes()
    command = PythonBytecode().command(path=str(path))

    def real(cmd: str) -> str | None:
        if cmd.endswith(command):
            return sh(command).stdout
        return None

    raw = {
        "defaults": {"distro": "debian12", "firewall": {"enabled": False}},
        "hosts": {"n": {"connection": {"address": "192.0.2.9"}}},
    }
    config = load(raw, source="test_bytecode").hosts["n"].config

    def deploy() -> None:
        python_bytecode(
            name="bytecode", path=str(path), source_sha256=hashlib.sha256(source).hexdigest()
        )

    run = run_deploys(config, {}, [deploy], [real])
    assert not run.failed
    planned = [c for c in run.commands if not c.endswith(command)]
    for cmd in planned:
        done = sh(cmd)
        assert done.returncode == 0, (cmd, done.stderr)
    return planned


def loaded_from(folder: Path, module: str = "mod") -> tuple[str, str]:
    """Import ``module`` as the probe imports pynvml (its folder first on sys.path, no
    bytecode written): (where the code object came from, what the module says)."""
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(folder)!r}); sys.dont_write_bytecode = True\n"
        f"import {module}\n"
        f"print({module}.VALUE)\n"
    )
    done = subprocess.run(
        [PYTHON, "-v", "-c", code], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, done.stderr
    origin = [
        line
        for line in done.stderr.splitlines()
        if line.startswith("# code object from") and f"/{module}." in line
    ]
    return (origin[0] if origin else ""), done.stdout.strip()


@pytest.fixture
def module(tmp_path: Path) -> Path:
    path = tmp_path / "lib" / "mod.py"
    path.parent.mkdir()
    path.write_text("VALUE = 'first'\n" + "".join(f"def f{i}(): return {i}\n" for i in range(500)))
    return path


def test_a_module_without_bytecode_is_compiled_and_then_loaded_from_it(module: Path) -> None:
    before = fact(module)
    assert before["state"] == "missing"
    assert before["source"] == hashlib.sha256(module.read_bytes()).hexdigest()
    assert bytecode_path_of(str(module), before["pyc"])
    origin, value = loaded_from(module.parent)
    assert ("from" in origin and ".pyc" not in origin.split("from", 1)[1], value) == (True, "first")
    planned = apply(module)
    assert len(planned) == 1 and "CHECKED_HASH" in planned[0]  # nothing there to remove
    after = fact(module)
    assert after == {**before, "state": "current"}
    assert oct(os.stat(after["pyc"]).st_mode & 0o777) == "0o644"
    origin, value = loaded_from(module.parent)
    assert after["pyc"] in origin and value == "first"
    # converged: nothing to do
    assert apply(module) == []


def test_a_changed_source_is_never_run_from_the_old_bytecode(module: Path) -> None:
    apply(module)
    module.write_text(module.read_text().replace("'first'", "'second'"))
    assert fact(module)["state"] == "stale"
    # Python checks the hash on import: the new source runs, not the old bytecode
    assert loaded_from(module.parent)[1] == "second"
    apply(module)
    assert fact(module)["state"] == "current"
    origin, value = loaded_from(module.parent)
    assert ".pyc" in origin and value == "second"


def test_a_source_replaced_in_the_same_run_is_compiled_after_it(module: Path) -> None:
    apply(module)
    new = module.read_bytes().replace(b"'first'", b"'third'")
    # the fact still says current (for the old source); the deploy puts ``new`` there
    planned = apply(module, content=new)
    assert any("CHECKED_HASH" in c for c in planned)


@pytest.mark.parametrize("how", ["mode", "link", "timestamp"])
def test_bytecode_anyone_could_rewrite_or_python_would_not_check_is_replaced(
    module: Path, how: str
) -> None:
    apply(module)
    pyc = Path(fact(module)["pyc"])
    if how == "mode":
        pyc.chmod(0o666)
    elif how == "link":
        target = pyc.with_name("elsewhere.pyc")
        pyc.rename(target)
        pyc.symlink_to(target)
    else:  # an ordinary (timestamp) pyc: Python would not compare it with the source
        pyc.unlink()
        done = subprocess.run(
            [PYTHON, "-c", f"import py_compile; py_compile.compile({str(module)!r})"],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert done.returncode == 0, done.stderr
    assert fact(module)["state"] == "stale"
    planned = apply(module)
    assert planned[0] == f"rm -f -- {pyc}"
    assert fact(module)["state"] == "current"
    assert not pyc.is_symlink() and oct(pyc.stat().st_mode & 0o777) == "0o644"


@need_root
def test_bytecode_not_owned_by_root_is_replaced(module: Path) -> None:
    apply(module)
    pyc = Path(fact(module)["pyc"])
    os.chown(pyc, 65534, 65534)
    assert fact(module)["state"] == "stale"
    apply(module)
    assert fact(module)["state"] == "current" and pyc.stat().st_uid == 0


def test_no_source_and_no_python(module: Path, tmp_path: Path) -> None:
    assert fact(tmp_path / "none.py")["state"] == "no-source"
    done = subprocess.run(
        ["/bin/sh", "-c", PythonBytecode().command(path=str(module))],
        capture_output=True,
        text=True,
        env={"PATH": str(tmp_path)},
        timeout=TIMEOUT,
    )
    assert PythonBytecode().process(done.stdout.splitlines())["state"] == "no-python"


@pytest.mark.parametrize(
    "pyc, ok",
    [
        ("/l/__pycache__/mod.cpython-311.pyc", True),
        ("/l/__pycache__/mod.cpython-311.opt-1.pyc", True),
        ("/l/__pycache__/mod.pypy39.pyc", True),
        ("/", False),
        ("", False),
        ("/etc/passwd", False),
        ("/l/__pycache__/other.cpython-311.pyc", False),
        ("/l/__pycache__/mod.cpython-311.pyc/../../x", False),
        ("/l/__pycache__/mod.x y.pyc", False),
        ("/l/mod.pyc", False),
    ],
)
def test_only_this_modules_bytecode_is_ever_removed(pyc: str, ok: bool) -> None:
    assert bytecode_path_of("/l/mod.py", pyc) is ok
