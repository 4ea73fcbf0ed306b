"""``gpunode verify``: run the host checks (tests/host) against an inventory's hosts.

testinfra connects with OpenSSH (its ``ssh://`` backend), using the inventory's
own connection data written to a temporary ssh_config, so host keys are checked
the same way pyinfra checks them. Each host is checked in its own pytest run (in
parallel); the checks learn which host and config they check from
GPUNODE_INVENTORY and GPUNODE_HOST.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET  # noqa: S405 - parsing our own pytest's JUnit output
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from gpunode.inventory import load_inventory_file
from gpunode.paths import HOST_TESTS
from gpunode.provenance import PATH as PROVENANCE_PATH
from gpunode.provenance import parse as parse_provenance
from gpunode.render import ssh_config_line, ssh_config_value
from gpunode.schema.node import Host, Inventory
from gpunode.schema.types import ConfigError


@dataclass
class HostResult:
    host: str
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    errors: int = 0
    returncode: int = 0
    junit: str = ""
    output: str = ""
    provenance: dict | None = None  # /etc/gpunode/provenance.json as found on the host

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.failed == 0 and self.errors == 0 and self.passed > 0

    def line(self) -> str:
        status = "ok" if self.ok else "FAILED"
        return (
            f"{self.host}: {status}: {self.passed} passed, {self.failed} failed, "
            f"{self.skipped} skipped, {self.errors} errors"
        )


def ssh_config_for(inventory: Inventory) -> str:
    """The ssh_config testinfra and ``ssh`` use: one ``Host`` block per inventory host, every
    value through :func:`gpunode.render.ssh_config_line` (quoted, %-tokens escaped; what
    ssh_config cannot represent is a ConfigError naming the host and key)."""
    lines = []
    for host in inventory.hosts.values():
        c = host.connection
        where = f"host {host.name}: connection."
        lines += [
            ssh_config_line("Host", host.name, f"host {host.name}: the inventory name"),
            "  " + ssh_config_line("HostName", c.address, where + "address"),
            "  " + ssh_config_line("Port", c.port, where + "port"),
            "  " + ssh_config_line("User", c.user, where + "user"),
        ]
        if c.key_file:
            lines += [
                "  " + ssh_config_line("IdentityFile", c.key_file, where + "key_file"),
                "  IdentitiesOnly yes",
            ]
        if c.known_hosts_file:
            lines.append(
                "  "
                + ssh_config_line(
                    "UserKnownHostsFile", c.known_hosts_file, where + "known_hosts_file"
                )
            )
        lines += [
            "  StrictHostKeyChecking "
            + ssh_config_value("StrictHostKeyChecking", c.strict_host_key_checking),
            "  BatchMode yes",
            "  ConnectTimeout 10",
            "  LogLevel ERROR",
        ]
        if c.ssh_config_file:
            lines.append(
                "  " + ssh_config_line("Include", c.ssh_config_file, where + "ssh_config_file")
            )
        lines.append("")
    return "\n".join(lines)


def select(inventory: Inventory, limit: list[str] | None) -> list[Host]:
    if not limit:
        return list(inventory.hosts.values())
    names: list[str] = []
    for item in limit:
        if item in inventory.hosts:
            names.append(item)
        elif item in inventory.groups:
            names += inventory.groups[item]
        else:
            allowed = ", ".join([*inventory.hosts, *inventory.groups])
            raise SystemExit(
                f"gpunode verify: --limit {item}: no such host or group (allowed: {allowed})"
            )
    return [inventory.hosts[n] for n in dict.fromkeys(names)]


def host_checks_argv(host: Host, ssh_config: Path, workdir: Path, junit: Path) -> list[str]:
    """The pytest run of the host checks for one host. A login other than root runs every
    check's command through sudo (testinfra's ``--sudo``), as deploys run with ``--sudo``:
    the checks read root-only files and call sysctl and modprobe, which are not even on an
    ordinary user's PATH."""
    argv = [
        sys.executable,
        "-m",
        "pytest",
        str(HOST_TESTS),
        "-q",
        "-p",
        "no:cacheprovider",
        f"--hosts=ssh://{host.name}?controlpath={workdir}/cm-{host.name}&controlpersist=5",
        f"--ssh-config={ssh_config}",
        f"--junitxml={junit}",
        "-o",
        f"junit_suite_name={host.name}",
        "--rootdir",
        str(HOST_TESTS),
    ]
    if host.connection.user != "root":
        argv.append("--sudo")
    return argv


def _run_host(inventory_path: str, host: Host, ssh_config: Path, workdir: Path) -> HostResult:
    junit = workdir / f"{host.name}.xml"
    env = {**os.environ, "GPUNODE_INVENTORY": str(inventory_path), "GPUNODE_HOST": host.name}
    proc = subprocess.run(
        host_checks_argv(host, ssh_config, workdir, junit),
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    result = HostResult(
        host=host.name, returncode=proc.returncode, output=proc.stdout + proc.stderr
    )
    result.provenance = _read_provenance(host, ssh_config, workdir)
    if junit.exists():
        result.junit = junit.read_text()
        root = ET.fromstring(result.junit)  # noqa: S314
        suites = [root] if root.tag == "testsuite" else list(root)
        for suite in suites:
            tests = int(suite.get("tests", 0))
            result.failed += int(suite.get("failures", 0))
            result.errors += int(suite.get("errors", 0))
            result.skipped += int(suite.get("skipped", 0))
            result.passed += (
                tests
                - int(suite.get("failures", 0))
                - int(suite.get("errors", 0))
                - int(suite.get("skipped", 0))
            )
    return result


def _read_provenance(host: Host, ssh_config: Path, workdir: Path) -> dict | None:
    proc = subprocess.run(
        [
            "ssh",
            "-F",
            str(ssh_config),
            "-o",
            f"ControlPath={workdir}/cm-{host.name}",
            host.name,
            f"cat {PROVENANCE_PATH}",
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    return parse_provenance(proc.stdout.splitlines()) if proc.returncode == 0 else None


def provenance_line(name: str, doc: dict | None) -> str:
    """One line per host: where its deploy came from and what the roles recorded."""
    if doc is None:
        return f"{name}: provenance: none ({PROVENANCE_PATH} missing or unreadable)"
    repo = doc.get("repository") or {}
    commit = (repo.get("commit") or "unknown")[:12]
    dirty = " (dirty)" if repo.get("dirty") else ""
    parts = [
        f"commit {commit}{dirty}",
        f"gpunode {doc.get('gpunode_version', '?')}",
        f"deployed {doc.get('deployed_at', '?')}",
    ]
    for section, values in sorted((doc.get("recorded") or {}).items()):
        if isinstance(values, dict):
            flat = " ".join(f"{k}={v}" for k, v in sorted(values.items()))
            parts.append(f"{section}: {flat}")
    return f"{name}: provenance: " + "; ".join(parts)


def verify(inventory_path: str, limit: list[str] | None = None, junit: str | None = None) -> int:
    inventory = load_inventory_file(inventory_path)
    hosts = select(inventory, limit)
    with tempfile.TemporaryDirectory(prefix="gpunode-verify-") as tmp:
        workdir = Path(tmp)
        ssh_config = workdir / "ssh_config"
        try:
            ssh_config.write_text(ssh_config_for(inventory))
        except ConfigError as exc:
            raise SystemExit(f"gpunode verify: {inventory_path}: {exc}") from None
        with ThreadPoolExecutor(max_workers=min(8, max(1, len(hosts)))) as pool:
            results = list(
                pool.map(lambda h: _run_host(inventory_path, h, ssh_config, workdir), hosts)
            )
    for result in results:
        if not result.ok:
            print(result.output.rstrip(), file=sys.stderr)
    for result in results:
        print(result.line())
    for result in results:
        print(provenance_line(result.host, result.provenance))
    if junit:
        _write_junit(junit, results)
    failed = [r.host for r in results if not r.ok]
    print(f"verify: {len(results) - len(failed)}/{len(results)} host(s) passed")
    return 1 if failed else 0


def _write_junit(path: str, results: list[HostResult]) -> None:
    root = ET.Element("testsuites")
    for result in results:
        if not result.junit:
            suite = ET.SubElement(root, "testsuite", name=result.host, tests="1", errors="1")
            case = ET.SubElement(suite, "testcase", classname=result.host, name="connect")
            ET.SubElement(case, "error", message="no result").text = result.output[-4000:]
            continue
        parsed = ET.fromstring(result.junit)  # noqa: S314
        for suite in [parsed] if parsed.tag == "testsuite" else list(parsed):
            suite.set("name", result.host)
            root.append(suite)
    ET.ElementTree(root).write(path, encoding="unicode", xml_declaration=True)
