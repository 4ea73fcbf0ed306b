#!/usr/bin/env python3
"""Write gpunode's lock files (pip's hash format, gpunode/locks.py) with ``uv pip compile``.

    python scripts/lock.py controller [--upgrade]
        locks/controller.txt: gpunode's dependencies (pyproject.toml) for the controller's
        wheelhouse, resolved for every controller Python (gpunode/controller.py) on x86_64
        and aarch64; it refuses to write a lock when those resolutions differ.
    python scripts/lock.py runtime PIN [PIN ...] [--python-version 3.11] [--machine x86_64]
                                      [--index-url URL] [--output FILE]
        locks/runtimes/<pins>.txt (or FILE): a runtime installed with method pip, resolved
        for that Python and machine (the node's).

Both resolve wheels only (``--only-binary :all:``) and list the sha256 of every file of each
pinned version (all platforms). An existing lock's pins are kept unless ``--upgrade``.
Needs ``uv`` (``pip install 'uv>=0.9,<1'``; it is in gpunode's test extra) and the index.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpunode import controller as ctl  # noqa: E402
from gpunode import locks  # noqa: E402
from gpunode.paths import REPO_ROOT  # noqa: E402

MACHINES = ("x86_64", "aarch64")
PLATFORM = "{machine}-manylinux_2_28"  # glibc 2.28+: Debian 10+, Ubuntu 20.04+, EL 8+


def compile_lock(
    requirements: list[str],
    python: str,
    machine: str,
    command: str,
    previous: Path | None,
    upgrade: bool,
    index_url: str | None,
) -> str:
    """uv's lock for ``requirements`` on that Python and machine (checked by gpunode's parser)."""
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "requirements.in", Path(tmp) / "lock.txt"
        source.write_text("".join(f"{r}\n" for r in requirements))
        if previous is not None and previous.exists() and not upgrade:
            shutil.copyfile(previous, out)  # uv keeps the pins of an existing output file
        argv = [
            sys.executable, "-m", "uv", "pip", "compile", "--quiet", "--no-config",
            "--generate-hashes", "--only-binary", ":all:",
            "--python-version", python, "--python-platform", PLATFORM.format(machine=machine),
            "--custom-compile-command", command,
            *(["--upgrade"] if upgrade else []),
            *(["--index-url", index_url] if index_url else []),
            str(source), "--output-file", str(out),
        ]  # fmt: skip
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"uv pip compile failed for Python {python} on {machine}:\n"
                             f"{proc.stderr.strip() or proc.stdout.strip()}")  # fmt: skip
        text = out.read_text()
    lock = locks.parse(text, f"(lock for Python {python} on {machine})")
    unpinned = lock.unpinned(r for r in requirements if "==" in r)
    if unpinned:
        raise SystemExit(f"the resolution does not hold {', '.join(unpinned)}")
    return text


def controller(args: argparse.Namespace) -> Path:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    requirements = list(project["project"]["dependencies"])
    target = locks.CONTROLLER_LOCK
    texts = {
        (python, machine): compile_lock(
            requirements, python, machine, "python scripts/lock.py controller",
            target, args.upgrade, args.index_url,
        )
        for python in sorted(set(ctl.CONTROLLER_PYTHON.values()))
        for machine in MACHINES
    }  # fmt: skip
    first = next(iter(texts.values()))
    pins = {key: locks.parse(text, "lock").entries for key, text in texts.items()}
    reference = next(iter(pins.values()))
    for key, entries in pins.items():
        if entries != reference:
            raise SystemExit(
                f"Python {key[0]} on {key[1]} resolves other packages than {next(iter(pins))}: "
                "one lock cannot serve every controller (split locks/controller.txt per Python)"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(first)
    return target


def runtime(args: argparse.Namespace) -> Path:
    name = locks.runtime_lock_name(args.pins)
    target = Path(args.output) if args.output else locks.RUNTIME_LOCKS / name
    command = " ".join(
        [
            "python scripts/lock.py runtime",
            *args.pins,
            f"--python-version {args.python_version} --machine {args.machine}",
        ]
    )
    text = compile_lock(
        args.pins, args.python_version, args.machine, command, target, args.upgrade,
        args.index_url,
    )  # fmt: skip
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--upgrade", action="store_true", help="newest versions, not the lock's")
    common.add_argument("--index-url", help="resolve from this index (default: PyPI)")
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser(
        "controller", parents=[common], help="locks/controller.txt (the controller's wheelhouse)"
    )
    rt = sub.add_parser(
        "runtime", parents=[common], help="locks/runtimes/<pins>.txt (a runtime, method pip)"
    )
    rt.add_argument("pins", nargs="+", help="the runtime's pins, as in the inventory")
    rt.add_argument("--python-version", default="3.11", help="the node's Python (default 3.11)")
    rt.add_argument("--machine", choices=MACHINES, default="x86_64")
    rt.add_argument("--output", help="write here instead of locks/runtimes/")
    args = parser.parse_args(argv)
    try:
        written = controller(args) if args.what == "controller" else runtime(args)
    except locks.LockError as exc:
        raise SystemExit(str(exc)) from None
    print(f"{written}: {len(locks.parse(written.read_text(), str(written)).entries)} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
