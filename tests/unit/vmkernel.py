"""A real Debian 12 kernel booted under QEMU (TCG, software emulation) with a small initramfs
of the test's own: what tests/unit/test_modules_vm.py uses to load kernel modules for real.

Not a test module (its name does not start with ``test_``). This machine's kernel has no
loadable modules and the lab hosts are containers: neither can load a module. So the
kernel of Debian's ``linux-image-amd64`` is booted directly (``-kernel``/``-initrd``), with:

* ``/bin/busybox`` (Debian's ``busybox-static``): the shell that runs ``/check`` as PID 1,
  and ``/bin/false``, ``mount``, ``poweroff``;
* Debian's real ``kmod`` (``/bin/kmod``, ``/sbin/modprobe`` -> it) with the shared
  libraries ``ldd`` names, copied from this machine (Debian 12's own);
* ``/lib/modules/<version>``: the modules asked for, and what ``modules.dep`` and
  ``modules.softdep`` say they need, from the same kernel package, indexed by the real
  ``depmod -b``;
* the files the caller gives (``/check``, ``/etc/modprobe.d/...``).

Debian's packages are fetched once (``apt-get download``, nothing installed) into
/var/cache/gpunode/vmkernel, keyed by their versions: ``kernel-<package>_<version>/`` keeps
the kernel image, the whole kernel's module index (``depmod`` of the full tree) and the
``.ko`` files of the modules asked for so far (asked for more, it fetches the kernel again);
``tools-<kmod>_<busybox>/`` keeps kmod and busybox. The initramfs itself is built anew on
every call (``build_initramfs``), under the cache's ``work/``, removed afterwards.
"""

from __future__ import annotations

import fcntl
import fnmatch
import functools
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness import apt_extract, missing_libraries

CACHE = Path("/var/cache/gpunode/vmkernel")
KERNEL_META = "linux-image-amd64"
INDEX_FILES = ("modules.dep", "modules.alias", "modules.softdep")
# copied into every initramfs as they are (depmod reads them to index the built-in modules)
KERNEL_FILES = ("modules.builtin", "modules.builtin.modinfo", "modules.order")
BUSYBOX_APPLETS = (
    "sh", "cat", "echo", "false", "true", "grep", "head", "tr", "wc", "mount", "umount",
    "mkdir", "poweroff", "sleep", "uname", "dmesg",
)  # fmt: skip


# a kernel's module index: name -> path, (alias pattern, name) pairs, name -> names it needs
Index = tuple[dict[str, str], list[tuple[str, str]], dict[str, list[str]]]


class Unavailable(Exception):
    """A prerequisite (a Debian package, QEMU) could not be had."""


def module_name(name: str) -> str:
    """The kernel's name of a module: '-' and '_' are the same to kmod and the kernel, and
    /proc/modules says '_' (usb-storage -> usb_storage)."""
    return name.replace("-", "_")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", text)


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            args, check=True, capture_output=True, text=True, timeout=300, **kwargs
        )
    except subprocess.CalledProcessError as exc:
        raise Unavailable(f"{' '.join(args)} failed: {exc.stderr.strip()}") from exc
    except (OSError, subprocess.SubprocessError) as exc:
        raise Unavailable(f"{' '.join(args)}: {exc}") from exc


def candidate(package: str) -> tuple[str, str]:
    """apt's candidate version of ``package`` (what ``apt-get download`` fetches), and the
    first package it depends on (for a metapackage: the real one)."""
    out = _run(["apt-cache", "show", "--no-all-versions", package]).stdout
    version = re.search(r"(?m)^Version: (\S+)$", out)
    if not version:
        raise Unavailable(f"apt knows no {package} (run apt-get update)")
    depends = re.search(r"(?m)^Depends: ([^\s,(]+)", out)
    return version[1], depends[1] if depends else ""


@contextmanager
def _locked() -> Iterator[None]:
    """One cache builder at a time (two test runs at once wait for each other)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _prune(prefix: str, keep: Path) -> None:
    """Drop what older package versions left in the cache (called with the lock held)."""
    for old in CACHE.glob(f"{prefix}*"):
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


# --- kmod and busybox ---------------------------------------------------------------------


@dataclass(frozen=True)
class Tools:
    root: Path  # kmod and busybox-static unpacked (dpkg-deb -x)

    @property
    def kmod(self) -> Path:
        return self.root / "bin/kmod"

    @property
    def busybox(self) -> Path:
        return self.root / "bin/busybox"

    def depmod(self, base: Path, version: str) -> None:
        """The real ``depmod -b base version`` (kmod called by that name)."""
        _run(["depmod", "-b", str(base), version], executable=str(self.kmod))

    def libraries(self) -> list[Path]:
        """The shared libraries kmod needs, as this machine's dynamic loader finds them
        (the loader itself included), by ``ldd``."""
        missing = missing_libraries(self.kmod, [])
        if missing:
            raise Unavailable(f"kmod needs {', '.join(missing)}, not on this machine")
        out = _run(["ldd", str(self.kmod)]).stdout
        found = re.findall(r"(?m)^\s*(?:\S+ => )?(/\S+) \(0x", out)
        if not any("ld-linux" in path for path in found):
            raise Unavailable(f"ldd names no dynamic loader for kmod: {out}")
        return [Path(path) for path in found]


def tools() -> Tools:
    kmod_version, _ = candidate("kmod")
    busybox_version, _ = candidate("busybox-static")
    root = CACHE / _safe(f"tools-kmod_{kmod_version}-busybox-static_{busybox_version}")
    if (root / "ready").exists():
        return Tools(root)
    with _locked():
        if not (root / "ready").exists():
            shutil.rmtree(root, ignore_errors=True)
            try:
                for package in ("kmod", "busybox-static"):
                    apt_extract(package, root)
            except (OSError, subprocess.SubprocessError, StopIteration) as exc:
                raise Unavailable(f"apt-get download kmod/busybox-static: {exc}") from exc
            (root / "ready").write_text(f"kmod {kmod_version}\nbusybox-static {busybox_version}\n")
            _prune("tools-", root)
    return Tools(root)


# --- the kernel ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    package: str  # linux-image-6.1.0-NN-amd64
    package_version: str
    version: str  # uname -r: 6.1.0-NN-amd64
    root: Path  # vmlinuz, index/ (the full tree's modules.*), pool/ (.ko files, by path)

    @property
    def vmlinuz(self) -> Path:
        return self.root / "vmlinuz"

    def _index(self) -> Index:
        return _read_index(self.root / "index")

    def has(self, name: str) -> bool:
        """Whether this kernel has ``name`` as a loadable module (not built in, not absent)."""
        return module_name(name) in self._index()[0]

    def closure(self, names: Iterable[str]) -> list[str]:
        """The paths of the modules ``names`` and of every module they need (modules.dep;
        modules.softdep, an alias there standing for every module it names)."""
        paths, aliases, needs = self._index()
        todo = [module_name(n) for n in names]
        seen: set[str] = set()
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in paths:
                todo += [module_name(n) for n in needs.get(name, [])]
            else:  # an alias (softdep on "crc32c": crc32c_generic, crc32c_intel)
                todo += [mod for pattern, mod in aliases if fnmatch.fnmatchcase(name, pattern)]
        return sorted(paths[n] for n in seen if n in paths)

    def _pooled(self, names: Iterable[str]) -> bool:
        return all((self.root / "pool" / p).exists() for p in self.closure(names))


@functools.cache
def _read_index(index: Path) -> Index:
    """A kernel's module index: name -> path (relative to /lib/modules/<version>), (alias
    pattern, name) pairs, and name -> the names modules.dep and modules.softdep say it needs."""
    paths: dict[str, str] = {}
    needs: dict[str, list[str]] = {}
    for line in (index / "modules.dep").read_text().splitlines():
        path, _, deps = line.partition(":")
        name = module_name(Path(path).name.split(".ko")[0])
        paths[name] = path
        needs[name] = [module_name(Path(d).name.split(".ko")[0]) for d in deps.split()]
    aliases = []
    for line in (index / "modules.alias").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "alias":
            aliases.append((parts[1], module_name(parts[2])))
    for line in (index / "modules.softdep").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[0] == "softdep":
            soft = [p for p in parts[2:] if p not in ("pre:", "post:")]
            needs.setdefault(module_name(parts[1]), []).extend(soft)
    return paths, aliases, needs


def kernel(modules: Iterable[str], tools: Tools) -> Kernel:
    """Debian's current kernel package (the candidate of linux-image-amd64), its ``.ko``
    files for ``modules`` (and what they need) in the pool."""
    modules = list(modules)
    version, package = candidate(KERNEL_META)
    if not package.startswith("linux-image-"):
        raise Unavailable(f"{KERNEL_META} {version} depends on {package!r}, not a kernel")
    package_version, _ = candidate(package)
    root = CACHE / _safe(f"kernel-{package}_{package_version}")
    found = _cached(package, package_version, root)
    if found and found._pooled(modules):
        return found
    with _locked():
        found = _cached(package, package_version, root)
        if found and found._pooled(modules):
            return found
        asked = set(modules)
        if (root / "asked").exists():
            asked |= set((root / "asked").read_text().split())
        return _fetch_kernel(package, package_version, root, sorted(asked), tools)


def _cached(package: str, package_version: str, root: Path) -> Kernel | None:
    if not (root / "ready").exists():
        return None
    return Kernel(package, package_version, (root / "ready").read_text().strip(), root)


def _fetch_kernel(
    package: str, package_version: str, root: Path, modules: list[str], tools: Tools
) -> Kernel:
    """apt-get download the kernel package, unpack it, index its whole module tree with
    depmod, and keep the image, the index and the modules asked for."""
    with tempfile.TemporaryDirectory(dir=CACHE) as staging:
        unpacked = Path(staging) / "x"
        try:
            apt_extract(package, unpacked)
        except (OSError, subprocess.SubprocessError, StopIteration) as exc:
            raise Unavailable(f"apt-get download {package}: {exc}") from exc
        versions = [p.name for p in (unpacked / "lib/modules").iterdir()]
        if len(versions) != 1:
            raise Unavailable(f"{package} has modules for {versions}, not one kernel")
        version = versions[0]
        tools.depmod(unpacked, version)
        tree = unpacked / "lib/modules" / version
        new = Path(staging) / "kernel"
        (new / "index").mkdir(parents=True)
        shutil.copy(unpacked / "boot" / f"vmlinuz-{version}", new / "vmlinuz")
        for name in INDEX_FILES + KERNEL_FILES:
            shutil.copy(tree / name, new / "index" / name)
        found = Kernel(package, package_version, version, new)
        for path in found.closure(modules):
            (new / "pool" / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(tree / path, new / "pool" / path)
        (new / "asked").write_text("\n".join(modules) + "\n")
        (new / "ready").write_text(version + "\n")
        shutil.rmtree(root, ignore_errors=True)
        os.rename(new, root)
    _prune("kernel-", root)
    return Kernel(package, package_version, version, root)


# --- the initramfs ------------------------------------------------------------------------


def build_initramfs(
    kernel: Kernel,
    tools: Tools,
    modules: Iterable[str],
    files: dict[str, tuple[str, int]],
    into: Path,
    copies: dict[str, Path] | None = None,
) -> Path:
    """``into``/initramfs.cpio (newc, uncompressed): busybox, kmod and its libraries, the
    modules ``modules`` need under /lib/modules/<version> indexed by the real depmod,
    ``files`` (path in the VM -> text, mode) and ``copies`` (path in the VM -> a file of this
    machine, copied with its mode)."""
    root = into / "root"
    for directory in ("bin", "sbin", "etc/modprobe.d", "proc", "sys", "dev", "mnt", "tmp"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    shutil.copy(tools.busybox, root / "bin/busybox")
    for applet in BUSYBOX_APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    shutil.copy(tools.kmod, root / "bin/kmod")
    for command in ("modprobe", "lsmod", "insmod", "rmmod", "modinfo", "depmod"):
        (root / "sbin" / command).symlink_to("/bin/kmod")
    for library in tools.libraries():
        target = root / library.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(library, target)  # follows the symlink: the file, under ldd's name
    tree = root / "lib/modules" / kernel.version
    tree.mkdir(parents=True, exist_ok=True)
    for path in kernel.closure(modules):
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(kernel.root / "pool" / path, tree / path)
    for name in KERNEL_FILES:
        shutil.copy(kernel.root / "index" / name, tree / name)
    tools.depmod(root, kernel.version)
    for path, (text, mode) in files.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)
    for path, source in (copies or {}).items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)  # follows a symlink: the file, under the name asked for
    out = into / "initramfs.cpio"
    with open(out, "wb") as cpio:
        _write_cpio(root, cpio)
    return out


def _cpio_entry(out, ino: int, name: str, mode: int, data: bytes = b"", rdev=(0, 0)) -> None:
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    out.write(header + name.encode() + b"\0")
    out.write(b"\0" * (-(len(header) + len(name) + 1) % 4))
    out.write(data + b"\0" * (-len(data) % 4))


def _write_cpio(root: Path, out) -> None:
    """root's tree as a newc cpio archive, owned by root, plus /dev/console."""
    ino = 1
    entries = sorted(root.rglob("*"))
    for path in entries:
        name = str(path.relative_to(root))
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            data = os.readlink(path).encode()
        elif stat.S_ISREG(st.st_mode):
            data = path.read_bytes()
        else:
            data = b""
        _cpio_entry(out, ino, name, st.st_mode, data)
        ino += 1
    _cpio_entry(out, ino, "dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    _cpio_entry(out, ino + 1, "TRAILER!!!", 0)


# --- QEMU ---------------------------------------------------------------------------------


def qemu() -> str:
    """qemu-system-x86_64 and the firmware it needs to start (SeaBIOS, even for -kernel)."""
    binary = shutil.which("qemu-system-x86_64")
    if not binary:
        raise Unavailable("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    return binary


@dataclass
class Boot:
    console: str  # the kernel's console (ttyS0): its boot messages, and what PID 1 prints
    results: str  # the second serial port (ttyS1): what PID 1 writes to /dev/ttyS1
    qemu_output: str  # QEMU's own stdout and stderr
    returncode: int | None  # None: it ran past the timeout and was killed
    seconds: float

    def tail(self, lines: int = 40) -> str:
        console = "\n".join(self.console.splitlines()[-lines:])
        results = "\n".join(self.results.splitlines()[-lines:])
        return (
            f"--- console (ttyS0), last {lines} lines:\n{console}\n"
            f"--- results (ttyS1):\n{results}\n--- QEMU said:\n{self.qemu_output}"
        )


def boot(
    kernel: Kernel,
    initramfs: Path,
    init: str,
    timeout: float,
    logs: Path,
    args: Iterable[str] = (),
) -> Boot:
    """Boot ``kernel`` with ``initramfs`` under TCG, ``init`` as PID 1, no network, ``args``
    added to the kernel's command line; the
    console (ttyS0) and a second serial port (ttyS1, for results: no kernel message falls
    amid them) into files under ``logs``. QEMU exits when the VM powers off (or when it
    panics, PID 1 gone: -no-reboot)."""
    console, results = logs / "console.log", logs / "results.log"
    command = [
        qemu(),
        "-accel", "tcg",
        "-m", "512",
        "-smp", "1",
        "-nodefaults",
        "-display", "none",
        "-nic", "none",
        "-no-reboot",
        "-serial", f"file:{console}",
        "-serial", f"file:{results}",
        "-kernel", str(kernel.vmlinuz),
        "-initrd", str(initramfs),
        "-append", " ".join([f"console=ttyS0 rdinit={init} panic=-1", *args]),
    ]  # fmt: skip
    start = time.monotonic()
    returncode: int | None = None
    try:
        proc = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout
        )
        returncode, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"") + (exc.stderr or b"")
    seconds = time.monotonic() - start

    def text(path: Path) -> str:
        raw = path.read_bytes() if path.exists() else b""
        return raw.decode(errors="replace").replace("\r", "")

    return Boot(text(console), text(results), output.decode(errors="replace"), returncode, seconds)
