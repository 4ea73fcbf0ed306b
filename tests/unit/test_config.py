"""Configuration validation: bad input thoroughly, good input briefly.

Every bad input is checked for the pieces of its message a user needs: the file,
the place (``defaults`` / ``group NAME`` / ``host NAME`` / ``inventory``), the key
path and what is allowed. A subset also goes through the real entry points:
``gpunode check`` and a real ``pyinfra`` run, which must stop before it opens any
TCP connection.

Tests marked ``xfail(strict=True)`` describe the message we want where the
current one is unclear; they start passing (and so fail, being strict) when
gpunode/config.py is improved, and the mark should then be removed.
"""

from __future__ import annotations

import ipaddress
import select
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpunode.config import load, load_file
from gpunode.inventory import EXIT_CONFIG, from_yaml
from gpunode.schema.distros import DISTROS
from gpunode.schema.node import Connection, Inventory, NodeConfig
from gpunode.schema.types import ConfigError

DISTRO_LIST = ", ".join(DISTROS)  # debian12, ubuntu2204, ..., as the messages list them
USER_HELP = (
    "a POSIX user name: a-z, 0-9, '_' and '-', starting with a letter or '_', at most 32 characters"
)
GROUP_HELP = "a-z, 0-9 and '_', starting with a letter (group names are Python names)"

# Placeholder for a host's connection mapping. In-process tests get an
# unroutable TEST-NET address; the pyinfra runs get the test's own listener.
CONN = "@CONN@"
OFFLINE_CONN = "{address: 192.0.2.1}"


def host(name: str = "gpu-01", extra: str = "") -> str:
    """A ``hosts:`` section with one host; ``extra`` is more YAML under the host."""
    return f"hosts:\n  {name}:\n    connection: {CONN}\n{extra}"


def render(yaml_text: str, conn: str = OFFLINE_CONN) -> str:
    return yaml_text.replace(CONN, conn)


@dataclass(frozen=True)
class Bad:
    id: str
    yaml: str
    where: str | None  # "defaults", "group X", "host X", "inventory", "YAML error"; None: none
    key: str | None  # key path after the place, e.g. base.admin_users[0].name
    allowed: tuple[str, ...] | None  # pieces that must follow "allowed: " on the same line
    also: tuple[str, ...] = ()  # more exact pieces anywhere in the message
    lines: int | None = 1  # lines in the message (None: YAML errors span several)
    xfail_location: str | None = None  # reason, where the message misnames the place or key
    xfail_allowed: str | None = None  # reason, where the message does not say what is allowed


# The firewall is on by default and then needs network CIDRs for every service: the cases
# here are about other keys, so their hosts run without it.
NO_FW = "firewall: {enabled: false}"
D = f"defaults: {{distro: debian12, {NO_FW}}}\n"

BAD = [
    # --- YAML level -------------------------------------------------------
    Bad(
        "yaml_syntax_error",
        "defaults:\n  distro: debian12\n  base: [unclosed\n" + host(),
        "YAML error",
        None,
        None,
        also=("line 3, column 9", "expected ',' or ']'"),
        lines=None,
    ),
    Bad(
        "yaml_duplicate_host_name",
        D + "hosts:\n  gpu-01:\n    connection: @CONN@\n  gpu-01:\n    connection: @CONN@\n",
        "YAML error",
        None,
        ("each key once per mapping, e.g. each host once",),
        also=("duplicate key 'gpu-01'", "first defined on line 3", "line 5, column 3"),
        lines=None,
    ),
    Bad(
        "empty_file",
        "# nothing here yet\n",
        None,
        None,
        ("a mapping with keys defaults, groups, hosts",),
        also=("the file is empty",),
    ),
    Bad(
        "top_level_list",
        "- gpu-01\n- gpu-02\n",
        None,
        None,
        None,
        also=("the inventory must be a mapping with keys defaults, groups, hosts (got list)",),
    ),
    # --- inventory structure ------------------------------------------------
    Bad(
        "unknown_top_level_key",
        D + "host: {}\n" + host(),
        "inventory",
        "host",
        ("defaults, groups, hosts",),
        also=("unknown key",),
    ),
    Bad(
        "hosts_missing",
        D,
        "inventory",
        "hosts",
        None,
        also=("required key is missing",),
    ),
    Bad(
        "connection_missing",
        D + "hosts:\n  gpu-01: {groups: []}\n",
        "host gpu-01",
        "connection",
        None,
        also=("required key is missing",),
    ),
    Bad(
        "duplicate_address_port",
        D + "hosts:\n  gpu-01:\n    connection: @CONN@\n  gpu-02:\n    connection: @CONN@\n",
        "host gpu-02",
        "connection.address",
        ("each host once",),
        also=("is already host gpu-01",),
    ),
    Bad(
        "duplicate_dns_name_case_and_default_port",
        D
        + "hosts:\n"
        + "  gpu-01:\n    connection: {address: Node1.example.com}\n"
        + "  gpu-02:\n    connection: {address: node1.example.com, port: 22}\n",
        "host gpu-02",
        "connection.address",
        ("each host once",),
        also=("node1.example.com:22 is already host gpu-01",),
    ),
    Bad(
        "group_name_invalid",
        D + "groups:\n  GPU-Nodes: {}\n" + host(),
        "group GPU-Nodes",
        None,  # the key part is "(top level)"; see test_group_name_error_key_part
        (GROUP_HELP,),
        also=("'GPU-Nodes' is not allowed",),
    ),
    Bad(
        "host_group_name_invalid",
        D + host(extra="    groups: [GPU-Nodes]\n"),
        "host gpu-01",
        "groups[0]",
        (GROUP_HELP,),
        also=("'GPU-Nodes' is not allowed",),
    ),
    Bad(
        "host_group_does_not_exist",
        D + "groups:\n  gpu_nodes: {}\n" + host(extra="    groups: [gpu_node]\n"),
        "host gpu-01",
        "groups",
        ("groups defined under 'groups:': gpu_nodes",),
        also=("group 'gpu_node' does not exist",),
    ),
    Bad(
        "host_group_does_not_exist_none_defined",
        D + host(extra="    groups: [gpu_nodes]\n"),
        "host gpu-01",
        "groups",
        ("groups defined under 'groups:': none are defined",),
        also=("group 'gpu_nodes' does not exist",),
    ),
    Bad(
        "host_group_listed_twice",
        D + "groups:\n  gpu_nodes: {}\n" + host(extra="    groups: [gpu_nodes, gpu_nodes]\n"),
        "host gpu-01",
        "groups",
        ("each group once",),
        also=("gpu_nodes listed twice",),
    ),
    # --- connection -----------------------------------------------------------
    Bad(
        "unknown_connection_key",
        D + "hosts:\n  gpu-01:\n    connection: {address: 192.0.2.1, username: admin}\n",
        "host gpu-01",
        "connection.username",
        (", ".join(sorted(Connection.model_fields)),),
        also=("unknown key",),
    ),
    Bad(
        "port_not_an_integer",
        D + 'hosts:\n  gpu-01:\n    connection: {address: 192.0.2.1, port: "abc"}\n',
        "host gpu-01",
        "connection.port",
        ("an integer", "1", "65535"),
        also=("'abc'", "valid integer", "(allowed: an integer from 1 to 65535)"),
    ),
    Bad(
        "port_out_of_range",
        D + "hosts:\n  gpu-01:\n    connection: {address: 192.0.2.1, port: 70000}\n",
        "host gpu-01",
        "connection.port",
        ("a number at most 65535",),
        also=("70000",),
    ),
    Bad(
        "address_invalid",
        D + "hosts:\n  gpu-01:\n    connection: {address: 'bad host!'}\n",
        "host gpu-01",
        "connection.address",
        ("e.g. 192.0.2.10, 2001:db8::10, gpu-01.example.com",),
        also=("'bad host!' is not an IP address or DNS name",),
    ),
    Bad(
        "strict_host_key_checking_unknown",
        D
        + "hosts:\n  gpu-01:\n"
        + "    connection: {address: 192.0.2.1, strict_host_key_checking: maybe}\n",
        "host gpu-01",
        "connection.strict_host_key_checking",
        ("'yes', 'no', 'accept-new'",),
        also=("'maybe'",),
    ),
    # --- node config: distro, base ------------------------------------------
    Bad(
        "distro_unknown",
        "defaults: {distro: debian13}\n" + host(),
        "defaults",
        "distro",
        (", ".join(f"'{d}'" for d in DISTROS),),
        also=("'debian13'",),
    ),
    Bad(
        "distro_not_set_anywhere",
        f"defaults: {{{NO_FW}}}\n" + host(),
        "host gpu-01",
        "distro",
        (DISTRO_LIST,),
        also=("not set",),
    ),
    Bad(
        "unknown_nested_key",
        "defaults: {distro: debian12, base: {ntp_server: [ntp.example.net]}}\n" + host(),
        "defaults",
        "base.ntp_server",
        (
            "admin_group, admin_users, apt_mirror, apt_proxy, auto_updates, hostname, "
            "journald, ntp_servers, packages, sudo_nopasswd",
        ),
        also=("unknown key",),
    ),
    Bad(
        "unknown_key_in_host_data",
        D + host(extra="    data: {nvidai: {branch: '580'}}\n"),
        "host gpu-01",
        "nvidai",
        (", ".join(sorted(NodeConfig.model_fields)),),
        also=("unknown key",),
    ),
    Bad(
        "unknown_key_in_admin_user_in_group",
        D
        + "groups:\n  gpu_nodes:\n    data:\n      base:\n"
        + "        admin_users: [{name: alice}, {name: bob, sshkeys: []}]\n"
        + host(extra="    groups: [gpu_nodes]\n"),
        "group gpu_nodes",
        "base.admin_users[1].sshkeys",
        ("name, shell, ssh_keys, sudo",),
        also=("unknown key",),
    ),
    Bad(
        "admin_user_sudo_not_bool",
        "defaults:\n  distro: debian12\n  base:\n    admin_users:\n"
        + '      - {name: alice, sudo: "maybe"}\n'
        + host(),
        "defaults",
        "base.admin_users[0].sudo",
        ("true or false",),
        also=("'maybe'",),
    ),
    Bad(
        "admin_user_name_invalid",
        "defaults:\n  distro: debian12\n  base:\n    admin_users: [{name: Alice}]\n" + host(),
        "defaults",
        "base.admin_users[0].name",
        (USER_HELP,),
        also=("'Alice' is not allowed",),
    ),
    Bad(
        "admin_user_root",
        "defaults:\n  distro: debian12\n  base:\n    admin_users: [{name: root}]\n" + host(),
        "defaults",
        "base.admin_users[0].name",
        ("any other name",),
        also=("root is not an admin user gpunode manages",),
    ),
    Bad(
        "admin_users_duplicate",
        D
        + host(
            extra="    data:\n      base:\n"
            "        admin_users: [{name: al}, {name: bo}, {name: al}]\n"
        ),
        "host gpu-01",
        "base.admin_users",
        ("each name once",),
        also=("admin user listed twice: al",),
    ),
    Bad(
        "admin_users_not_a_list",
        "defaults: {distro: debian12, base: {admin_users: alice}}\n" + host(),
        "defaults",
        "base.admin_users",
        ("a list, e.g. [a, b]",),
        also=("'alice'",),
    ),
    Bad(
        "ntp_servers_empty",
        "defaults: {distro: debian12, base: {ntp_servers: []}}\n" + host(),
        "defaults",
        "base.ntp_servers",
        ("a list of at least 1 item",),
        also=("[]",),
    ),
    Bad(
        "journald_size_invalid",
        "defaults: {distro: debian12, base: {journald: {system_max_use: 2GB}}}\n" + host(),
        "defaults",
        "base.journald.system_max_use",
        ("a size such as 512M or 2G",),
        also=("'2GB' is not allowed",),
    ),
    Bad(
        "apt_mirror_on_dnf_distro",
        f"defaults: {{distro: rhel9, {NO_FW}, base: {{apt_mirror: 'http://mirror.example.net/'}}}}\n"
        + host(),
        "host gpu-01",
        "base.apt_mirror",
        ("unset it",),
        also=("only apt distros use an apt mirror, rhel9 uses dnf",),
    ),
    Bad(
        "inventory_name_not_a_hostname",
        D + host(name="GPU_01"),
        "host GPU_01",
        "base.hostname",
        ("set base.hostname, lowercase letters, digits and '-'",),
        also=("'GPU_01' is not a valid hostname",),
    ),
    Bad(
        "base_hostname_invalid",
        D + host(extra="    data: {base: {hostname: gpu_01}}\n"),
        "host gpu-01",
        "base.hostname",
        ("a hostname label: a-z, 0-9 and '-', at most 63 characters",),
        also=("'gpu_01' is not allowed",),
    ),
    # --- network ---------------------------------------------------------------
    Bad(
        "cidr_with_host_bits",
        D
        + "groups:\n  gpu_nodes:\n    data: {network: {admin_cidrs: [10.0.0.1/24]}}\n"
        + host(extra="    groups: [gpu_nodes]\n"),
        "group gpu_nodes",
        "network.admin_cidrs[0]",
        ("e.g. 10.0.0.0/24 or 2001:db8::/64, with no host bits set",),
        also=("'10.0.0.1/24' is not a network in CIDR notation", "has host bits set"),
    ),
    Bad(
        "cidr_garbage",
        D + host(extra="    data: {network: {admin_cidrs: [10.0.0.0/8, not-a-net]}}\n"),
        "host gpu-01",
        "network.admin_cidrs[1]",
        ("e.g. 10.0.0.0/24 or 2001:db8::/64, with no host bits set",),
        also=("'not-a-net' is not a network in CIDR notation",),
    ),
    Bad(
        "ipv6_cidr_with_host_bits",
        "defaults: {distro: debian12, network: {monitoring_cidrs: ['2001:db8::1/64']}}\n" + host(),
        "defaults",
        "network.monitoring_cidrs[0]",
        ("e.g. 10.0.0.0/24 or 2001:db8::/64, with no host bits set",),
        also=("'2001:db8::1/64'", "has host bits set"),
    ),
    Bad(
        "cidrs_not_a_list",
        "defaults: {distro: debian12, network: {app_cidrs: 10.0.0.0/8}}\n" + host(),
        "defaults",
        "network.app_cidrs",
        ("a list, e.g. [a, b]",),
        also=("'10.0.0.0/8'",),
    ),
    # --- nvidia ----------------------------------------------------------------
    Bad(
        "driver_branch_unknown",
        "defaults: {distro: debian12, nvidia: {branch: 999}}\n" + host(),
        "defaults",
        "nvidia.branch",
        ("535, 550, 570, 575, 580",),
        also=("'999' is not a driver branch gpunode knows",),
    ),
    Bad(
        "nvidia_version_outside_branch",
        f"defaults: {{distro: debian12, {NO_FW}, nvidia: {{branch: '570', version: 580.65.06}}}}\n"
        + host(),
        "host gpu-01",  # checked on the merged config only: the branch may come later
        "nvidia.version",
        ("570.x versions, or change nvidia.branch",),
        also=("580.65.06 is not in branch 570",),
    ),
    Bad(
        "nvidia_version_outside_branch_after_merge",
        f"defaults: {{distro: debian12, {NO_FW}, nvidia: {{version: '580.82.07'}}}}\n"
        + host(extra="    data: {nvidia: {branch: '570'}}\n"),
        "host gpu-01",
        "nvidia.version",
        ("570.x versions, or change nvidia.branch",),
        also=("580.82.07 is not in branch 570",),
    ),
]

BY_ID = {case.id: case for case in BAD}
assert len(BY_ID) == len(BAD), "case ids must be unique"


def _params(kind: str) -> list:
    """The cases as pytest params, xfail-marked where the ``kind`` of message is unclear."""
    out = []
    for case in BAD:
        if kind == "allowed" and case.allowed is None:
            continue  # nothing sensible to allow (a YAML syntax error, a missing key)
        reason = case.xfail_location if kind == "location" else case.xfail_allowed
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


def write_inventory(directory: Path, case: Bad, conn: str = OFFLINE_CONN) -> Path:
    path = directory / "inv.yml"
    path.write_text(render(case.yaml, conn), encoding="utf-8")
    return path


def error_for(case: Bad, directory: Path) -> tuple[Path, str]:
    path = write_inventory(directory, case)
    with pytest.raises(ConfigError) as info:
        load_file(path)
    return path, str(info.value)


def prefix(path: Path | str, case: Bad, with_key: bool = True) -> str:
    out = f"{path}: "
    if case.where:
        out += f"{case.where}: "
    if with_key and case.key:
        out += f"{case.key}: "
    return out


def the_line(message: str, start: str) -> str:
    lines = [line for line in message.splitlines() if line.startswith(start)]
    assert len(lines) == 1, f"expected one line starting {start!r} in:\n{message}"
    return lines[0]


# --- bad input, in process ------------------------------------------------------


def test_enough_distinct_bad_inputs() -> None:
    assert len(BAD) >= 18
    assert len({case.yaml for case in BAD}) == len(BAD)


@pytest.mark.parametrize("case", _params("location"))
def test_bad_input_names_file_place_and_key(case: Bad, tmp_path: Path) -> None:
    path, message = error_for(case, tmp_path)
    the_line(message, prefix(path, case))
    for piece in case.also:
        assert piece in message, f"{piece!r} not in:\n{message}"
    if case.lines is not None:
        assert len(message.splitlines()) == case.lines, message


@pytest.mark.parametrize("case", _params("allowed"))
def test_bad_input_says_what_is_allowed(case: Bad, tmp_path: Path) -> None:
    path, message = error_for(case, tmp_path)
    line = the_line(message, prefix(path, case, with_key=False))
    assert "allowed: " in line, f"no 'allowed: ' in {line!r}"
    after = line.split("allowed: ", 1)[1]
    assert case.allowed is not None
    for piece in case.allowed:
        assert piece in after, f"{piece!r} not in the allowed part of {line!r}"


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    path = tmp_path / "inv.yml"
    path.write_text(
        "defaults: {distro: debian12}\n"
        "groups:\n  gpu_nodes:\n    data: {nvidia: {branch: '999'}}\n"
        "hosts:\n"
        "  gpu-01:\n    connection: {address: 192.0.2.1}\n    groups: [gpu_nodes]\n"
        "  gpu-02:\n    connection: {address: 192.0.2.2}\n"
        "    data: {base: {admin_users: [{name: root}]}}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        load_file(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"{path}: group gpu_nodes: nvidia.branch: ")
    assert lines[1].startswith(f"{path}: host gpu-02: base.admin_users[0].name: ")


def test_from_yaml_exits_2_with_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case = BY_ID["admin_user_root"]
    path = write_inventory(tmp_path, case)
    with pytest.raises(SystemExit) as info:
        from_yaml(tmp_path / "inv.py")
    assert info.value.code == EXIT_CONFIG == 2
    err = capsys.readouterr().err
    assert err.startswith("gpunode: invalid configuration\n")
    assert prefix(path, case) in err


def test_unreadable_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yml"
    with pytest.raises(ConfigError, match=r"missing\.yml: cannot read inventory data: "):
        load_file(missing)


# --- messages made clearer (the one strict xfail documents a wish still open) ----------


@pytest.mark.parametrize("case_id", ["yaml_syntax_error", "yaml_duplicate_host_name"])
def test_yaml_error_location_names_the_file(case_id: str, tmp_path: Path) -> None:
    path, message = error_for(BY_ID[case_id], tmp_path)
    assert "<unicode string>" not in message
    assert f'"{path}", line' in message


def test_empty_file_says_it_is_empty(tmp_path: Path) -> None:
    path, message = error_for(BY_ID["empty_file"], tmp_path)
    assert "NoneType" not in message
    assert message == (
        f"{path}: the file is empty (allowed: a mapping with keys defaults, groups, hosts)"
    )


def test_cidr_error_names_list_index(tmp_path: Path) -> None:
    path, message = error_for(BY_ID["cidr_garbage"], tmp_path)
    the_line(message, f"{path}: host gpu-01: network.admin_cidrs[1]: 'not-a-net' ")


def test_group_name_error_key_part(tmp_path: Path) -> None:
    path, message = error_for(BY_ID["group_name_invalid"], tmp_path)
    assert "[key]" not in message
    the_line(message, f"{path}: group GPU-Nodes: ")


def test_group_name_error_has_no_top_level_marker(tmp_path: Path) -> None:
    _, message = error_for(BY_ID["group_name_invalid"], tmp_path)
    assert "(top level)" not in message


def test_connection_user_invalid_is_one_problem(tmp_path: Path) -> None:
    path = tmp_path / "inv.yml"
    path.write_text(
        D + "hosts:\n  gpu-01:\n    connection: {address: 192.0.2.1, user: Admin}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        load_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: host gpu-01: connection.user: 'Admin' is not allowed")
    assert f"(allowed: {USER_HELP})" in message
    assert len(message.splitlines()) == 1, message


@pytest.mark.parametrize("name", ["ungrouped", "all"])
def test_group_named_as_pyinfra_group_is_refused(name: str) -> None:
    """pyinfra's own groups: a user group 'ungrouped' would be overwritten, so it is refused."""
    raw = {
        "defaults": {"distro": "debian12"},
        "groups": {name: {}},
        "hosts": {
            "a": {"connection": {"address": "192.0.2.1"}, "groups": [name]},
            "b": {"connection": {"address": "192.0.2.2"}},
        },
    }
    with pytest.raises(ConfigError) as info:
        load(raw, "inv.yml")
    assert str(info.value) == (
        f"inv.yml: group {name}: the name is pyinfra's own "
        "(allowed: any other name than all, ungrouped)"
    )


# --- real entry points: gpunode check and pyinfra --------------------------------------

CLI_CASES = [
    "yaml_syntax_error",
    "yaml_duplicate_host_name",
    "duplicate_address_port",
    "port_out_of_range",
    "distro_unknown",
    "admin_user_root",
    "cidr_with_host_bits",
    "host_group_does_not_exist",
    "apt_mirror_on_dnf_distro",
]

# Cases whose connection stays valid, so pyinfra would connect if gpunode let it.
PYINFRA_CASES = [
    "yaml_duplicate_host_name",
    "duplicate_address_port",
    "distro_unknown",
    "admin_user_root",
    "host_group_does_not_exist",
    "apt_mirror_on_dnf_distro",
]

INVENTORY_PY = (
    "from gpunode.inventory import from_yaml\n"
    "_gpunode = from_yaml(__file__)\n"
    "globals().update(_gpunode.pyinfra_groups())\n"
)
DEPLOY_PY = 'from pyinfra.operations import server\nserver.shell(name="noop", commands=["true"])\n'


def gpunode_command() -> list[str]:
    script = Path(sys.executable).with_name("gpunode")
    if script.exists():
        return [str(script)]
    found = shutil.which("gpunode")
    return [found] if found else [sys.executable, "-m", "gpunode.commands.cli"]


def run_check(target: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*gpunode_command(), "check", str(target)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


class Listener:
    """A TCP listener on 127.0.0.1 that counts connections and closes each at once.

    Closing at once makes paramiko fail fast ("Error reading SSH protocol banner")
    instead of waiting for a banner that never comes.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _accept_pending(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            self.connections += 1
            conn.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            readable, _, _ = select.select([self.sock], [], [], 0.05)
            if readable:
                self._accept_pending()

    def close(self) -> int:
        """Stop serving; return the number of connections seen, pending ones included."""
        if self._stop.is_set():
            return self.connections
        self._stop.set()
        self._thread.join(timeout=5)
        readable, _, _ = select.select([self.sock], [], [], 0)
        if readable:
            self._accept_pending()
        self.sock.close()
        return self.connections


@pytest.fixture
def listener() -> Iterator[Listener]:
    lst = Listener()
    yield lst
    lst.close()


def run_pyinfra(directory: Path) -> subprocess.CompletedProcess[str]:
    (directory / "inv.py").write_text(INVENTORY_PY, encoding="utf-8")
    (directory / "deploy.py").write_text(DEPLOY_PY, encoding="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "pyinfra", "-y", "inv.py", "deploy.py"],
        cwd=directory,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("case_id", CLI_CASES)
def test_gpunode_check_exits_2(case_id: str, tmp_path: Path) -> None:
    case = BY_ID[case_id]
    path = write_inventory(tmp_path, case)
    result = run_check(path)
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert result.stderr.startswith("gpunode: invalid configuration\n"), result.stderr
    assert prefix(path, case) in result.stderr
    for piece in case.also:
        assert piece in result.stderr


def test_gpunode_check_inventory_py_exits_2(tmp_path: Path) -> None:
    case = BY_ID["distro_unknown"]
    path = write_inventory(tmp_path, case)
    (tmp_path / "inv.py").write_text(INVENTORY_PY, encoding="utf-8")
    result = run_check(tmp_path / "inv.py")
    assert result.returncode == 2, result
    assert prefix(path, case) in result.stderr


def test_gpunode_check_good_inventory(tmp_path: Path) -> None:
    path = tmp_path / "inv.yml"
    text = D + "groups:\n  gpu_nodes: {}\n" + host(extra="    groups: [gpu_nodes]\n")
    path.write_text(render(text), encoding="utf-8")
    result = run_check(path)
    assert result.returncode == 0, result
    assert "gpu-01: debian12 groups=gpu_nodes" in result.stdout
    assert f"{path}: 1 host(s), configuration valid" in result.stdout


@pytest.mark.parametrize("case_id", PYINFRA_CASES)
def test_pyinfra_stops_before_connecting(case_id: str, tmp_path: Path, listener: Listener) -> None:
    case = BY_ID[case_id]
    conn = f"{{address: 127.0.0.1, port: {listener.port}}}"
    assert CONN in case.yaml, "the case must use the listener as its connection"
    write_inventory(tmp_path, case, conn=conn)
    result = run_pyinfra(tmp_path)
    connections = listener.close()
    assert result.returncode != 0, result.stdout
    assert "gpunode: invalid configuration" in result.stdout, result.stdout
    # pyinfra runs inv.py from its cwd, so the message names inv.yml relative to it
    assert prefix("inv.yml", case) in result.stdout, result.stdout
    assert "Connecting to hosts" not in result.stdout
    assert connections == 0, "pyinfra opened a TCP connection despite the bad config"


def test_pyinfra_connects_with_good_config(tmp_path: Path, listener: Listener) -> None:
    """Positive control: the listener does see pyinfra when the config is valid."""
    (tmp_path / "inv.yml").write_text(
        D + f"hosts:\n  gpu-01:\n    connection: {{address: 127.0.0.1, port: {listener.port}}}\n",
        encoding="utf-8",
    )
    result = run_pyinfra(tmp_path)
    connections = listener.close()
    assert "gpunode: invalid configuration" not in result.stdout
    assert "Connecting to hosts" in result.stdout, result.stdout
    assert result.returncode != 0  # not an SSH server: the handshake fails
    assert connections >= 1, result.stdout


# --- good input -------------------------------------------------------------------------


def load_text(tmp_path: Path, text: str) -> Inventory:
    path = tmp_path / "inv.yml"
    path.write_text(text, encoding="utf-8")
    return load_file(path)


def test_ipv6_and_ipv4_cidrs_accepted(tmp_path: Path) -> None:
    inv = load_text(
        tmp_path,
        "defaults:\n  distro: debian12\n  network:\n"
        "    admin_cidrs: ['2001:db8::/64', 10.0.0.0/8]\n"
        "    monitoring_cidrs: ['fd00::/8']\n" + render(host()),
    )
    net = inv.hosts["gpu-01"].config.network
    assert net.admin_cidrs == [
        ipaddress.IPv6Network("2001:db8::/64"),
        ipaddress.IPv4Network("10.0.0.0/8"),
    ]
    assert net.monitoring_cidrs == [ipaddress.IPv6Network("fd00::/8")]


def test_merge_order_defaults_groups_in_order_then_host(tmp_path: Path) -> None:
    inv = load_text(
        tmp_path,
        "defaults:\n"
        "  distro: debian12\n"
        f"  {NO_FW}\n"
        "  nvidia: {branch: '535', kernel_modules: proprietary}\n"
        "  base: {journald: {system_max_use: 1G, max_retention_sec: 1week}}\n"
        "groups:\n"
        "  first:\n    data: {nvidia: {branch: '550'}, base: {journald: {system_max_use: 3G}}}\n"
        "  second:\n    data: {nvidia: {branch: '570'}, gpu: {count: 4}}\n"
        "hosts:\n"
        "  gpu-01:\n    connection: {address: 192.0.2.1}\n    groups: [first, second]\n"
        "    data: {gpu: {count: 8}}\n"
        "  gpu-02:\n    connection: {address: 192.0.2.2}\n    groups: [second, first]\n",
    )
    one, two = inv.hosts["gpu-01"].config, inv.hosts["gpu-02"].config
    assert one.nvidia.branch == "570"  # the later group wins
    assert two.nvidia.branch == "550"
    assert one.nvidia.kernel_modules == "proprietary"  # from defaults, merged not replaced
    assert one.gpu.count == 8 and two.gpu.count == 4  # host data wins over groups
    assert one.base.journald.system_max_use == "3G"  # nested mappings merge key by key
    assert one.base.journald.max_retention_sec == "1week"


def test_lists_replace_rather_than_append(tmp_path: Path) -> None:
    inv = load_text(
        tmp_path,
        f"defaults:\n  distro: debian12\n  {NO_FW}\n"
        "  base: {ntp_servers: [a.example.net, b.example.net], admin_users: [{name: alice}]}\n"
        "groups:\n  gpu_nodes:\n    data: {base: {admin_users: [{name: bob}]}}\n"
        "hosts:\n  gpu-01:\n    connection: {address: 192.0.2.1}\n    groups: [gpu_nodes]\n"
        "    data: {base: {ntp_servers: [c.example.net]}}\n",
    )
    base = inv.hosts["gpu-01"].config.base
    assert base.ntp_servers == ["c.example.net"]
    assert [u.name for u in base.admin_users] == ["bob"]


def test_pyinfra_groups_and_ungrouped(tmp_path: Path) -> None:
    inv = load_text(
        tmp_path,
        f"defaults: {{distro: ubuntu2404, {NO_FW}}}\n"
        "groups:\n  gpu_nodes: {}\n  empty_group: {}\n"
        "hosts:\n"
        "  gpu-01:\n    connection: {address: 192.0.2.1, port: 2222, user: admin,"
        " key_file: /k}\n    groups: [gpu_nodes]\n"
        "  cpu-01:\n    connection: {address: cpu-01.example.net}\n"
        "  cpu-02:\n    connection: {address: 192.0.2.1}\n",  # same address, other port: fine
    )
    groups = inv.pyinfra_groups()
    assert set(groups) == {"gpu_nodes", "empty_group", "ungrouped"}
    assert groups["empty_group"] == []
    assert [name for name, _ in groups["ungrouped"]] == ["cpu-01", "cpu-02"]
    [(name, data)] = groups["gpu_nodes"]
    assert name == "gpu-01"
    assert data["ssh_hostname"] == "192.0.2.1"
    assert data["ssh_port"] == 2222
    assert data["ssh_user"] == "admin"
    assert data["ssh_key"] == "/k"
    assert data["ssh_strict_host_key_checking"] == "yes"
    assert data["ssh_connect_retries"] == 2  # transient connect failures are retried
    assert isinstance(data["gpunode"], NodeConfig)
    assert data["gpunode"].distro == "ubuntu2404"
    _, cpu = groups["ungrouped"][0]
    assert (cpu["ssh_port"], cpu["ssh_user"]) == (22, "root")


def test_defaults_apply_and_hostname_override(tmp_path: Path) -> None:
    inv = load_text(
        tmp_path,
        f"defaults: {{distro: rocky9, {NO_FW}, nvidia: {{branch: 580, version: 580.82.07}}}}\n"
        "hosts:\n  GPU_01:\n    connection: {address: 192.0.2.1}\n"
        "    data: {base: {hostname: gpu-01}}\n",
    )
    config = inv.hosts["GPU_01"].config
    assert config.base.hostname == "gpu-01"
    assert config.nvidia.branch == "580"  # a YAML integer is accepted as the branch name
    assert config.base.ntp_servers  # defaults from the schema
    assert "nvidia-" in config.base.auto_updates.hold


def test_a_yaml_alias_bomb_ends_in_a_short_error(tmp_path: Path) -> None:
    """Nested aliases expand to millions of items: the error stays short and names the key
    (values are shown cut short, problems per layer are capped)."""
    levels = ['&a ["x","x","x","x","x","x","x","x","x"]']
    for prev, name in zip("abcde", "bcdef", strict=True):
        levels.append(f"&{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    path = tmp_path / "bomb.yml"
    path.write_text(
        "defaults:\n  distro: debian12\n  base:\n    packages: [" + ", ".join(levels) + "]\n"
        "hosts:\n  gpu-01: {connection: {address: 192.0.2.10}}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_file(path)
    message = str(err.value)
    assert len(message) < 5000, len(message)
    assert message.startswith(f"{path}: defaults: base.packages[0]: ['x', 'x', 'x'")
    assert "Input should be a valid string" in message


def test_problems_per_layer_are_capped() -> None:
    raw = {
        "defaults": {"distro": "debian12", "base": {"packages": [[]] * 100}},
        "hosts": {"gpu-01": {"connection": {"address": "192.0.2.10"}}},
    }
    with pytest.raises(ConfigError) as err:
        load(raw, "inv.yml")
    lines = str(err.value).splitlines()
    assert len(lines) == 31
    assert lines[-1] == "inv.yml: defaults: ... and 70 more problems"


# --- malformed files, strict types, one spelling per address, collisions ----------------


def _deep(tmp: Path) -> str:
    return "defaults: " + "[" * 10_000 + "]" * 10_000 + "\nhosts: {}\n"


def _alias_chain(tmp: Path) -> str:
    chain = "".join(f"    x{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 2000))
    return "defaults:\n  base:\n    x0: &a0 [1]\n" + chain + "hosts: {}\n"


MALFORMED: dict[str, tuple[bytes | Callable[[Path], str], str]] = {
    "utf16": ("defaults: {}\n".encode("utf-16"), "the file is UTF-16 (allowed: UTF-8 text)"),
    "not-utf8": (b"defaults:\n  distro: deb\xffian12\n", "line 2: byte 0xff is not UTF-8"),
    "deep-list": (_deep, "nest more than 64 levels deep (allowed: at most 64)"),
    "alias-chain": (_alias_chain, "counting aliases (allowed: at most 64)"),
    "alias-cycle": (b"defaults: &a {x: *a}\nhosts: {}\n", "an alias refers to a node"),
    "python-tag": (
        b"defaults: !!python/object/apply:os.system [id]\nhosts: {}\n",
        "could not determine a constructor for the tag",
    ),
    "duplicate-key": (b"defaults: {distro: debian12, distro: rocky9}\n", "duplicate key"),
    "number-key": (b"defaults: {80: x}\nhosts: {}\n", "the key 80 is a int, not a string"),
    "list-key": (b"defaults: {? [a]: x}\nhosts: {}\n", "is a list, not a string"),
    "top-level-list": (b"- a\n- b\n", "must be a mapping"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_file_ends_in_a_clear_error_naming_it(case: str, tmp_path: Path) -> None:
    content, expected = MALFORMED[case]
    path = tmp_path / "inv.yml"
    if callable(content):
        path.write_text(content(tmp_path), encoding="utf-8")
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_file(path)
    assert str(err.value).startswith(f"{path}: "), str(err.value)
    assert expected in str(err.value)
    assert len(str(err.value)) < 2000


def test_a_file_over_the_size_limit_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "inv.yml"
    with path.open("wb") as out:  # 100 MB of one comment: parsing it would take minutes
        out.write(b"# " + b"x" * (100 * 2**20) + b"\n")
    with pytest.raises(ConfigError, match=r"larger than 4 MiB \(allowed: an inventory of at most"):
        load_file(path)


def test_merge_keys_with_overrides_still_work(tmp_path: Path) -> None:
    inv = load_text(
        tmp_path,
        f"defaults: &d\n  distro: debian12\n  {NO_FW}\n"
        "hosts:\n  gpu-01:\n    connection: {address: 192.0.2.1}\n"
        "    data:\n      <<: *d\n      distro: rocky9\n",
    )
    assert inv.hosts["gpu-01"].config.distro == "rocky9"


def test_a_utf8_bom_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "inv.yml"
    path.write_bytes(b"\xef\xbb\xbf" + render(D + host()).encode())
    assert load_file(path).hosts["gpu-01"].config.distro == "debian12"


@pytest.mark.parametrize(
    ("yaml_text", "key", "allowed"),
    [
        ("defaults: {gpu: {required: 1}}", "defaults: gpu.required: 1:", "true or false"),
        ("defaults: {nomad: {enabled: 'yes'}}", "defaults: nomad.enabled: 'yes':", "true or false"),
        ("defaults: {monitoring: {node_exporter_port: true}}",
         "defaults: monitoring.node_exporter_port: True:", "an integer from 1 to 65535"),
        ("defaults: {vault: {timeout: '10'}}", "defaults: vault.timeout: '10':", "a number"),
        ("defaults: {gpu: {count: '8'}}", "defaults: gpu.count: '8':", "an integer from 0 to 64"),
        # a bound on one side only; a field inside a list
        ("defaults: {base: {journald: {rate_limit_burst: x}}}",
         "defaults: base.journald.rate_limit_burst: 'x':", "an integer of at least 0"),
        ("defaults: {firewall: {extra_input: [{name: web, port: x, cidrs: [192.0.2.0/24]}]}}",
         "defaults: firewall.extra_input[0].port: 'x':", "an integer from 1 to 65535"),

    ],
)  # fmt: skip
def test_types_are_strict(yaml_text: str, key: str, allowed: str, tmp_path: Path) -> None:
    """A boolean is not a number, a number is not a boolean, a string is neither."""
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, yaml_text + "\n" + render(host()))
    assert f"inv.yml: {key}" in str(err.value)
    assert f"(allowed: {allowed})" in str(err.value)


def test_integer_bounds_come_from_the_fields_own_constraints() -> None:
    """The allowed clause of a field that is not an integer names its bounds, from the schema
    (not written twice); none where the field has none, or where the place is not a field."""
    from typing import Annotated

    from pydantic import BaseModel, Field

    from gpunode.config import _int_bounds

    class Inner(BaseModel):
        free: int = 0
        low: Annotated[int, Field(ge=2)] = 2
        high: Annotated[int, Field(le=9)] | None = None

    class Outer(BaseModel):
        items: list[Inner] = []
        named: dict[str, Inner] = {}

    assert _int_bounds(Outer, ("items", 0, "free")) == ""
    assert _int_bounds(Outer, ("items", 0, "low")) == " of at least 2"
    assert _int_bounds(Outer, ("named", "x", "high", "int")) == " of at most 9"
    assert _int_bounds(Outer, ("named", "x", "nothing")) == ""
    assert _int_bounds(Outer, ("items",)) == ""


def test_a_port_as_a_string_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"host gpu-01: connection.port: '22': .*an integer"):
        load_text(
            tmp_path, D + "hosts:\n  gpu-01: {connection: {address: 192.0.2.1, port: '22'}}\n"
        )
    inv = load_text(tmp_path, D + "hosts:\n  gpu-01: {connection: {address: 192.0.2.1}}\n"
                    "  gpu-02: {connection: {address: 192.0.2.1, port: 2222}}\n")  # fmt: skip
    assert inv.hosts["gpu-01"].config.vault.timeout == 10.0  # an int where a float goes is fine


@pytest.mark.parametrize(
    ("first", "second", "shown"),
    [
        ("2001:db8::10", "'2001:DB8:0::10'", "2001:db8::10:22"),
        ("gpu-01.example.com", "GPU-01.Example.COM.", "gpu-01.example.com:22"),
        ("192.0.2.10", "192.0.2.10", "192.0.2.10:22"),
    ],
)
def test_two_spellings_of_one_address_are_one_host(
    first: str, second: str, shown: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, D + f"hosts:\n  a: {{connection: {{address: {first}}}}}\n"
                  f"  b: {{connection: {{address: {second}}}}}\n")  # fmt: skip
    assert f"host b: connection.address: {shown} is already host a" in str(err.value)


@pytest.mark.parametrize("address", ["192.0.2.010", "2130706433", "fe80::1%eth0", "-x.example"])
def test_an_address_with_another_meaning_is_refused(address: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="host a: connection.address: "):
        load_text(tmp_path, D + f"hosts:\n  a: {{connection: {{address: '{address}'}}}}\n")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("base: {admin_users: [{name: daemon}]}", "base.admin_users[0].name: 'daemon' is a system"),
        ("base: {admin_users: [{name: systemd-x}]}", "'systemd-x' is a system account"),
        ("base: {admin_users: [{name: nomad}]}",
         "'nomad' is a system account or the user of a package"),
        ("base: {admin_users: [{name: gpunode-chat}]}", "gpunode-<name> is the user of inference"),
        ("base: {admin_group: shadow}", "base.admin_group: 'shadow' is a system group"),
        ("secrets: {k: {path: p, key: k, owner: nobody}}", "secrets.k.owner: 'nobody' is a system"),
        ("secrets: {k: {path: p, key: k, group: disk}}",
         "secrets.k.group: 'disk' is a system group"),
    ],
)  # fmt: skip
def test_a_name_that_is_a_system_account_is_refused(
    data: str, message: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, f"defaults: {{distro: debian12, {NO_FW}, {data}}}\n" + render(host()))
    assert message in str(err.value)


def test_sudo_and_wheel_stay_allowed_as_the_admin_group(tmp_path: Path) -> None:
    text = f"defaults: {{distro: rocky9, {NO_FW}, base: {{admin_group: wheel}}}}\n"
    inv = load_text(tmp_path, text + render(host()))
    assert inv.hosts["gpu-01"].config.base.admin_group == "wheel"


@pytest.mark.parametrize(
    ("data", "port", "message"),
    [
        ("monitoring: {node_exporter_port: 2222}", 2222,
         "monitoring.node_exporter_port: 2222 is the SSH port (connection.port"),
        ("monitoring: {dcgm_exporter_port: 2222}", 2222,
         "monitoring.dcgm_exporter_port: 2222 is the SSH port (connection.port"),
        ("nomad: {enabled: true, servers: ['10.0.0.1:4647'], device_plugin: {enabled: false}},"
         " monitoring: {node_exporter_port: 4646}", 22,
         "nomad.enabled (the Nomad agent's port 4646): 4646 is already used by "
         "monitoring.node_exporter_port (allowed: a port no other listener on the node uses)"),
    ],
)  # fmt: skip
def test_two_listeners_on_one_port_are_refused(
    data: str, port: int, message: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, f"defaults: {{distro: debian12, {NO_FW}, {data}}}\n"
                  f"hosts:\n  gpu-01: {{connection: {{address: 192.0.2.1, port: {port}}}}}\n"
                  )  # fmt: skip
    assert f"host gpu-01: {message}" in str(err.value)
    assert len(str(err.value).splitlines()) == 1, str(err.value)
