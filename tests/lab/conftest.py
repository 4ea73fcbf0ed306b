"""Lab tests: real hosts (systemd-nspawn), real sshd/apt/systemd, real OpenBao.

They need root. Under CI=true they fail loudly when the lab cannot start;
elsewhere, without root, they are skipped with the reason.
The test lab is separate from the one `make lab` leaves up (own name, subnet, ports).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hvac
import pytest

from gpunode.commands.drift import bookkeeping
from gpunode.commands.lab import LabSettings
from gpunode.facts.seal import SEAL_SWITCH
from gpunode.paths import REPO_ROOT

IN_CI = os.environ.get("CI") == "true"
# GPUNODE_TEST_SLOT=N (1-9) gives a test run its own labs (names, subnets, Vault ports),
# so several checkouts can run lab tests on one machine at once. Default: slot 0.
SLOT = int(os.environ.get("GPUNODE_TEST_SLOT", "0"))
if not 0 <= SLOT <= 9:
    raise SystemExit(f"GPUNODE_TEST_SLOT={SLOT}: allowed: 0 to 9")


def lab_env(kind: str, number: int) -> dict[str, str]:
    """Settings for one of the test labs: ``kind`` is a name stem, ``number`` 1-9."""
    octet = number if SLOT == 0 else 10 * number + SLOT
    return {
        "GPUNODE_LAB_NAME": f"{kind}{SLOT or ''}",
        "GPUNODE_LAB_SUBNET": f"10.231.{octet}.0/24",
        "GPUNODE_LAB_SUBNET6": f"fd42:231:{octet}::/64",
        "GPUNODE_LAB_VAULT_PORT": str(18000 + 100 * number + 10 * SLOT),
    }


TEST_LAB_ENV = lab_env("test", 2)


def run(
    cmd: list[str],
    env: dict[str, str] | None = None,
    timeout: float = 900,
    check: bool = False,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    stdin = {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
    proc = subprocess.run(
        cmd,
        cwd=REPO_ROOT,
        # lab tests check what the full plan does (a second deploy changes nothing, a drift
        # check names exactly what drifted): the drift seal's shortcut is off unless a
        # test turns it on (tests/lab/test_seal.py compares the two)
        env={**os.environ, SEAL_SWITCH: os.environ.get(SEAL_SWITCH, "0"), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        **stdin,  # type: ignore[arg-type]
    )
    if check and proc.returncode != 0:
        output = f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{output}")
    return proc


def gpunode(
    *args: str, env: dict[str, str] | None = None, **kw
) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "gpunode.commands.cli", *args], env=env, **kw)


def pyinfra(
    *args: str, env: dict[str, str] | None = None, **kw
) -> subprocess.CompletedProcess[str]:
    """A real run (-y). Note: -y also skips pyinfra's change detection, so plans use dry()."""
    return run([sys.executable, "-m", "pyinfra", "-y", *args], env=env, **kw)


def dry(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess[str]:
    """A dry run with change detection (no -y: with stdin closed, --dry never prompts)."""
    return run([sys.executable, "-m", "pyinfra", "--dry", *args], env=env, **kw)


def changes(output: str) -> tuple[int, int]:
    """(changed, errors) from pyinfra's results table's Grand total line."""
    match = re.search(r"Grand total\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)", output)
    assert match, f"no results table in pyinfra output:\n{output[-3000:]}"
    as_int = [0 if v == "-" else int(v) for v in match.groups()[1:3]]
    return as_int[0], as_int[1]


def planned_changes(inventory: str, deploy: str, env: dict[str, str]) -> dict[str, list[str]]:
    """Per host, the operations a dry run says would change (pyinfra --dry --json)."""
    proc = dry("--json", inventory, deploy, env=env, check=True)
    plan = json.loads(proc.stdout)["plan"]
    per_host: dict[str, list[str]] = {}
    for op in plan:
        if bookkeeping(op["name"]):
            continue  # the seal, AIDE's database: follow any change, not drift (drift agrees)
        for host in op["hosts_with_change"]:
            per_host.setdefault(host, []).append(op["name"])
    return per_host


class Hidden(str):
    """A credential a test holds (an API key): used as the string it is, shown as
    ``'<hidden>'`` by repr, which is what pytest prints of it when an assertion fails."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'<hidden>'"


@dataclass
class Lab:
    env: dict[str, str]
    state_dir: Path
    hosts: list[str]

    @property
    def settings(self) -> LabSettings:
        return LabSettings.from_env(
            name=self.env["GPUNODE_LAB_NAME"],
            subnet=ipaddress.IPv4Network(self.env["GPUNODE_LAB_SUBNET"]),
            subnet6=ipaddress.IPv6Network(self.env["GPUNODE_LAB_SUBNET6"]),
            vault_port=int(self.env["GPUNODE_LAB_VAULT_PORT"]),
            state_dir=self.state_dir,
        )

    def address(self, host: str) -> str:
        """The IPv4 address of lab host ``lab-NN``."""
        return self.settings.host_address(int(host.rsplit("-", 1)[1]))

    def ssh(self, host: str, command: str, **kw) -> subprocess.CompletedProcess[str]:
        return run(["ssh", "-F", str(self.state_dir / "ssh_config"), host, command], **kw)


def require_root() -> None:
    if os.geteuid() == 0:
        return
    if IN_CI:
        pytest.fail("lab tests need root and CI=true: refusing to skip them")
    pytest.skip("lab tests need root (they run under CI as root)")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """Fresh lab hosts for each test module (a few seconds with the base image cached), so no
    module depends on what another one did to the hosts or on the order they run in."""
    require_root()
    env = dict(TEST_LAB_ENV)
    gpunode("lab", "down", env=env)  # start from fresh hosts
    up = gpunode("lab", "up", "--hosts", "2", env=env)
    if up.returncode != 0:
        pytest.fail(f"the lab did not start:\n{up.stdout}\n{up.stderr}")
    state_dir = REPO_ROOT / ".lab" / env["GPUNODE_LAB_NAME"]
    yield Lab(env=env, state_dir=state_dir, hosts=["lab-01", "lab-02"])
    gpunode("lab", "down", env=env, check=True)


def host_checks(lab: Lab, name: str, checks: str, env: dict[str, str], inventory: str) -> None:
    """tests/host/``checks`` on lab host ``name``, as `gpunode verify` runs them (testinfra
    over the lab's SSH config), with ``env`` (the lab's, and the test's data): every check
    passes, and at least one ran."""
    proc = run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(REPO_ROOT / "tests" / "host" / checks),
            f"--hosts=ssh://{name}",
            f"--ssh-config={lab.state_dir / 'ssh_config'}",
            "--rootdir",
            str(REPO_ROOT / "tests" / "host"),
        ],
        env={**env, "GPUNODE_INVENTORY": inventory, "GPUNODE_HOST": name},
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert " failed" not in proc.stdout and " passed" in proc.stdout


def umask_027_sessions(lab: Lab, host: str) -> None:
    """Make ``host`` run as a CIS-built Ubuntu does: pam_umask in common-session (Ubuntu's stock
    line) and UMASK 027 in login.defs before gpunode's first deploy, so every command gpunode
    runs there has umask 027 from the first one. What gpunode installs for its services must
    not depend on the umask of its own session."""
    lab.ssh(
        host,
        "sed -i -E 's/^UMASK[[:space:]].*/UMASK\\t\\t027/' /etc/login.defs && "
        "echo 'session optional pam_umask.so' >> /etc/pam.d/common-session",
        check=True,
    )
    assert lab.ssh(host, "umask", check=True).stdout.strip() == "0027"


def front_door_lab(deploy: str = "deploys/gpu_node.py") -> Iterator[Lab]:
    """The test lab with the front door (`gpunode lab up --front-door`, what `make lab`
    runs: lab-01 serves a real model behind the gateway), deployed once; down afterwards.
    For a module fixture: ``yield from front_door_lab()``."""
    require_root()
    env = dict(TEST_LAB_ENV)
    gpunode("lab", "down", env=env)
    up = gpunode("lab", "up", "--hosts", "2", "--front-door", env=env, timeout=5400)
    if up.returncode != 0:
        pytest.fail(f"the lab did not start:\n{up.stdout}\n{up.stderr}")
    state_dir = REPO_ROOT / ".lab" / env["GPUNODE_LAB_NAME"]
    the_lab = Lab(env=env, state_dir=state_dir, hosts=["lab-01", "lab-02"])
    umask_027_sessions(the_lab, "lab-01")  # the node that serves the model
    done = pyinfra("inventories/lab.py", deploy, env=env, timeout=1800)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    yield the_lab
    gpunode("lab", "down", env=env, check=True)


def root_vault(lab: Lab) -> hvac.Client:
    """The lab's OpenBao with its root token (for what a Vault admin would do)."""
    creds = json.loads((lab.state_dir / "vault.json").read_text())
    return hvac.Client(url=creds["addr"], token=creds["root_token"], timeout=10)
