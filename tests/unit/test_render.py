"""The renderers of gpunode/render.py, checked against the real readers of each format.

- ssh_config: the file ``gpunode verify`` writes (gpunode/commands/verify.py) is read back by
  the real ``ssh -G`` (OpenSSH's own parser, which prints every option it resolved): a hostile
  connection value adds no option and each path comes back exactly.
- DKMS's framework.conf: the file roles/nvidia_driver.py uploads (run through pyinfra's real API
  on the ``@fake`` connector) is sourced by a real ``sh``: each variable is exactly the path, and
  nothing in a hostile path runs (a canary file that must not appear).
- sudoers and dnf.conf values: quoting and refusals (the files themselves are checked by the
  real ``visudo`` in tests/lab/test_access.py and by the real ini parser in test_base_role.py).

Hostile values reach the renderers here past config load (``model_copy`` does not validate):
the schema refuses most of them already, and these tests prove the renderers hold on their own.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from harness import HOST, run_deploys
from pyinfra.api import deploy

from gpunode import nvidia as nv
from gpunode.commands.verify import ssh_config_for
from gpunode.config import load
from gpunode.render import (
    haproxy_address,
    haproxy_map_line,
    haproxy_path,
    haproxy_string,
    haproxy_word,
    ini_value,
    shell_value,
    ssh_config_value,
    sudoers_value,
)
from gpunode.schema.node import Inventory
from gpunode.schema.types import ConfigError
from roles.nvidia_driver import _module_signing

SSH = shutil.which("ssh")


def inventory(**connection: Any) -> Inventory:
    raw = {
        "defaults": {"distro": "debian12", "firewall": {"enabled": False}},
        "hosts": {HOST: {"connection": {"address": "192.0.2.10", **connection}}},
    }
    return load(raw, source="test_render")


def with_connection(inv: Inventory, name: str = HOST, **values: Any) -> Inventory:
    """The inventory with connection values set past validation (as a hostile caller could)."""
    host = inv.hosts[HOST]
    changed = host.model_copy(
        update={"name": name, "connection": host.connection.model_copy(update=values)}
    )
    return inv.model_copy(update={"hosts": {name: changed}})


def ssh_g(config: str, tmp_path: Path, host: str = HOST) -> dict[str, str]:
    """What the real ssh resolves for ``host`` from this config (``ssh -G``: no connection)."""
    assert SSH, "OpenSSH's ssh client (openssh-client) is needed"
    path = tmp_path / "ssh_config"
    path.write_text(config)
    proc = subprocess.run(
        [SSH, "-G", "-F", str(path), host], capture_output=True, text=True, timeout=10
    )
    assert proc.returncode == 0, proc.stderr
    options: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition(" ")
        options[key] = f"{options[key]}\n{value}" if key in options else value
    return options


BASELINE = {"key_file": "/keys/id", "known_hosts_file": "/keys/known_hosts"}


@pytest.mark.parametrize(
    "key_file, known_hosts_file, shown_key, shown_known",
    [
        ("/home/op/my keys/id_ed25519", "/home/op/known hosts", None, None),
        ("/keys/a#b=c", "/keys/kh#1=2", None, None),
        # ssh -G prints IdentityFile before token expansion ("%%" is a literal "%") and
        # UserKnownHostsFile after it
        ("/keys/50%h", "/keys/kh%h", "/keys/50%%h", "/keys/kh%h"),
    ],
)
def test_ssh_config_paths_come_back_exactly_and_add_no_option(
    key_file: str, known_hosts_file: str, shown_key: str | None, shown_known: str | None,
    tmp_path: Path,
) -> None:  # fmt: skip
    base = inventory(**BASELINE)
    before = ssh_g(ssh_config_for(base), tmp_path)
    values = {"key_file": key_file, "known_hosts_file": known_hosts_file}
    after = ssh_g(ssh_config_for(with_connection(base, **values)), tmp_path)

    assert after["identityfile"] == (shown_key or key_file)
    assert after["userknownhostsfile"] == (shown_known or known_hosts_file)
    differ = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert differ == {"identityfile", "userknownhostsfile"}


INJECTIONS = [
    "~/.ssh/k\n  ProxyCommand sh -c 'id>/tmp/x'",  # the finding: a newline starts an option
    "~/.ssh/k\r\n  LocalCommand id",
    '/keys/k" ProxyCommand "id',  # a quote would end the argument
    "/keys/k' ProxyCommand 'id",
    "/keys/k\\",
    "${HOME}/.ssh/k",  # expanded by ssh, no escape exists
]


@pytest.mark.parametrize("field", ["key_file", "known_hosts_file", "ssh_config_file"])
@pytest.mark.parametrize("value", INJECTIONS)
def test_ssh_config_refuses_what_it_cannot_represent(field: str, value: str) -> None:
    if field == "ssh_config_file" and value == "${HOME}/.ssh/k":
        value = "/etc/ssh/*.conf"  # Include expands glob(7) wildcards instead
    hostile = with_connection(inventory(**BASELINE), **{field: value})
    with pytest.raises(ConfigError, match=rf"host {HOST}: connection\.{field}: .*\(allowed: "):
        ssh_config_for(hostile)


@pytest.mark.parametrize("name", ["gpu-01\n  ProxyCommand id", "gpu-*", "gpu-01 other", "!gpu"])
def test_ssh_config_refuses_host_names_that_are_patterns(name: str) -> None:
    hostile = with_connection(inventory(**BASELINE), name=name)
    with pytest.raises(ConfigError, match=r"the inventory name: .*\(allowed: "):
        ssh_config_for(hostile)


def test_ssh_config_the_finding_no_longer_resolves_a_proxycommand(tmp_path: Path) -> None:
    """Issue 13 finding 4, end to end: whatever ssh_config_for returns, the real ssh resolves
    no ProxyCommand or LocalCommand from it (before the fix it resolved `sh -c 'id>/tmp/x'`)."""
    hostile = with_connection(
        inventory(**BASELINE), key_file="~/.ssh/k\n  ProxyCommand sh -c 'id>/tmp/x'"
    )
    try:
        config = ssh_config_for(hostile)
    except ConfigError as exc:
        assert "connection.key_file" in str(exc)
        return
    options = ssh_g(config, tmp_path)
    assert "proxycommand" not in options and "localcommand" not in options
    assert options["identityfile"] == "~/.ssh/k\n  ProxyCommand sh -c 'id>/tmp/x'"


def test_ssh_config_include_and_defaults(tmp_path: Path) -> None:
    included = tmp_path / "extra config"
    included.write_text("ServerAliveInterval 42\n")
    inv = with_connection(inventory(**BASELINE), ssh_config_file=str(included))
    options = ssh_g(ssh_config_for(inv), tmp_path)
    assert options["serveraliveinterval"] == "42"  # the quoted path with a space was read
    assert options["hostname"] == "192.0.2.10" and options["user"] == "root"
    assert options["batchmode"] == "yes" and options["stricthostkeychecking"] == "true"


# --- DKMS framework.conf: sourced by a shell --------------------------------------------------


HOSTILE_PATHS = [
    "/var/lib/mok/my key.priv",
    "/var/lib/mok/$(touch CANARY).priv",
    "/var/lib/mok/`touch CANARY`.priv",
    "/var/lib/mok/k';touch CANARY;'.priv",
    '/var/lib/mok/k";touch CANARY;".priv',
    "/var/lib/mok/k&touch CANARY&.priv",
    "/var/lib/mok/k|touch CANARY|.priv",
    "/var/lib/mok/${HOME}.priv",
    "/var/lib/mok/k\\.priv",
]


def dkms_signing_conf(key_file: str, cert_file: str) -> str:
    """The framework.conf drop-in roles/nvidia_driver.py uploads for these paths."""
    from gpunode.config import load as load_config

    raw = {
        "defaults": {
            "distro": "ubuntu2404",
            "firewall": {"enabled": False},
            "nvidia": {"module_signing": {"key_file": "/k", "cert_file": "/c"}},
        },
        "hosts": {HOST: {"connection": {"address": "192.0.2.10"}}},
    }
    config = load_config(raw, source="test_render").hosts[HOST].config
    signing = config.nvidia.module_signing
    assert signing
    hostile = signing.model_copy(update={"key_file": key_file, "cert_file": cert_file})
    config = config.model_copy(
        update={"nvidia": config.nvidia.model_copy(update={"module_signing": hostile})}
    )
    run = run_deploys(config, {}, [deploy("dkms signing")(lambda: _module_signing(config))])
    assert not run.failed
    return run.files[nv.DKMS_SIGNING_CONF]


@pytest.mark.parametrize("path", HOSTILE_PATHS)
def test_dkms_framework_conf_sourced_by_sh_yields_exactly_the_path(
    path: str, tmp_path: Path
) -> None:
    conf = tmp_path / "gpunode-signing.conf"
    conf.write_text(dkms_signing_conf(path, path + ".der"))
    for var, want in (("mok_signing_key", path), ("mok_certificate", path + ".der")):
        proc = subprocess.run(
            ["sh", "-c", f'. ./{conf.name}; printf %s "${var}"'],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=10,
            env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"},
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == want
        assert proc.stderr == ""
    assert not (tmp_path / "CANARY").exists(), "a path ran a command"


def test_dkms_framework_conf_refuses_a_newline() -> None:
    with pytest.raises(ConfigError, match=r"nvidia\.module_signing\.key_file: .*control"):
        dkms_signing_conf("/var/lib/mok/k\nmok_certificate=/tmp/x", "/var/lib/mok/c")


# --- values of other formats ------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, rendered",
    [("/var/log/sudo.log", '"/var/log/sudo.log"'), ('/l/a"b\\c', '"/l/a\\"b\\\\c"')],
)
def test_sudoers_value_is_quoted_and_escaped(value: str, rendered: str) -> None:
    assert sudoers_value(value) == rendered


@pytest.mark.parametrize("render", [sudoers_value, ini_value, shell_value])
@pytest.mark.parametrize("value", ["a\nb", "a\rb", "a\x00b", "a\x1bb", "a\u2028b"])
def test_control_characters_are_refused(render: Any, value: str) -> None:
    with pytest.raises(ConfigError, match=r"where: .*control character.*\(allowed: "):
        render(value, "where")


@pytest.mark.parametrize("value", [" http://p:3128", "http://p:3128 "])
def test_ini_value_refuses_whitespace_it_would_lose(value: str) -> None:
    with pytest.raises(ConfigError, match=r"whitespace \(allowed: "):
        ini_value(value, "base.apt_proxy")


def test_ssh_config_value_doubles_percent_only_where_tokens_expand() -> None:
    assert ssh_config_value("IdentityFile", "/k/50%") == "/k/50%%"
    assert ssh_config_value("User", "a%b") == "a%b"


# --- systemd command lines and Environment= (inference units) -------------------------------

SYSTEMD_HOSTILE = [
    "plain-arg",
    "--flag=value",
    "two words",
    "semi;colon",
    ";",
    "$(id)",
    "${HOME}",
    "%h",
    'quote"d',
    "back\\slash",
    "it's",
]


def _systemd_split(line: str) -> list[str]:
    """How systemd reads a command line (systemd.service(5) "Command lines"): words split
    like a POSIX shell's double-quoted words, then "%%" is "%" and "$$" is "$"."""
    return [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(line)]


def test_a_systemd_command_line_keeps_every_argument_whole() -> None:
    from gpunode.render import systemd_command_line

    line = systemd_command_line(["/opt/server", *SYSTEMD_HOSTILE])
    assert _systemd_split(line) == ["/opt/server", *SYSTEMD_HOSTILE]
    # no unquoted separator, specifier or variable reaches systemd
    assert " ; " not in f" {line} " and "%h" not in line.replace("%%", "")
    assert "$(" not in line.replace("$$", "") and "${" not in line.replace("$$", "")


def test_plain_arguments_are_written_as_they_were() -> None:
    """Converged hosts keep their unit files: plain words are not quoted."""
    from gpunode.render import systemd_assignment, systemd_command_line

    argv = ["/opt/gpunode/venvs/x/bin/vllm", "serve", "/var/lib/m", "--port", "8000"]
    assert systemd_command_line(argv) == " ".join(argv)
    assert systemd_assignment("CUDA_VISIBLE_DEVICES", "") == "CUDA_VISIBLE_DEVICES="
    assert systemd_assignment("HOME", "/var/cache/x") == "HOME=/var/cache/x"


def test_an_environment_assignment_is_one_word() -> None:
    from gpunode.render import systemd_assignment

    line = systemd_assignment("NAME", 'a b "c" %h')
    assert [w.replace("%%", "%") for w in shlex.split(line)] == ['NAME=a b "c" %h']
    with pytest.raises(ConfigError, match="control character"):
        systemd_assignment("NAME", "a\nExecStartPre=/bin/sh")


# --- HAProxy ------------------------------------------------------------------------------
# (the files themselves are read by the real haproxy in tests/unit/test_haproxy.py)


@pytest.mark.parametrize(
    "value",
    ["be_chat", "/etc/haproxy/gpunode/keys.map", "org/model:v1.5", "a+b=c@d", "0" * 64],
)
def test_haproxy_word_passes_plain_words(value: str) -> None:
    assert haproxy_word(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "two words",
        "tab\there",
        "new\nline",
        "nul\x00",
        "esc\x1b[0m",
        "line\u2028sep",
        "quote'd",
        'quote"d',
        "hash#comment",
        "back\\slash",
        "${HOME}",
        "%[req.hdr(host)]",
        "map(x),lower",
        "arg)",
        "-m",
        "-i",
        "!negated",
        "{ anonymous }",
        "a||b",
        "caf\u00e9",
        "semi;colon",
        "star*",
    ],
)
def test_haproxy_word_refuses_what_haproxy_would_misread(value: str) -> None:
    with pytest.raises(ConfigError, match=r"where: .*\(allowed: "):
        haproxy_word(value, "where")


@pytest.mark.parametrize(
    "value", ["relative/path", "/a//b", "/a/./b", "/a/../b", "/a/", "unix@/run/x", "/a b"]
)
def test_haproxy_path_refuses_what_is_not_a_plain_absolute_path(value: str) -> None:
    with pytest.raises(ConfigError, match="where: "):
        haproxy_path(value, "where")
    assert haproxy_path("/run/haproxy/admin.sock") == "/run/haproxy/admin.sock"


def test_haproxy_string_single_quotes() -> None:
    body = '{"error": {"message": "no such route", "code": 404}}'
    assert haproxy_string(body) == f"'{body}'"
    assert haproxy_string('a $HOME %[x] "y"') == "'a $HOME %[x] \"y\"'"


@pytest.mark.parametrize("value", ["it's", "back\\slash", "#x", "a\nb", "a\rb", "caf\u00e9"])
def test_haproxy_string_refuses_what_a_single_quoted_argument_cannot_hold(value: str) -> None:
    with pytest.raises(ConfigError, match="where: "):
        haproxy_string(value, "where")


def test_haproxy_address() -> None:
    assert haproxy_address("127.0.0.1", 8000) == "127.0.0.1:8000"
    assert haproxy_address("0.0.0.0", 8443) == "0.0.0.0:8443"  # noqa: S104
    assert haproxy_address("::", 8443) == "ipv6@:::8443"
    assert haproxy_address("0:0::1", 8443) == "ipv6@::1:8443"


@pytest.mark.parametrize(
    "address, port",
    [
        ("localhost", 80),
        ("127.0.0.1 ssl", 80),
        ("127.0.0.1:80", 80),
        ("unix@/x", 80),
        ("[::1]", 80),
        ("127.0.0.1", 0),
        ("127.0.0.1", 65536),
        ("127.0.0.1", True),
        ("127.0.0.1", "80"),
    ],
)
def test_haproxy_address_refuses_what_is_not_an_ip_and_port(address: str, port: Any) -> None:
    with pytest.raises(ConfigError, match="where: "):
        haproxy_address(address, port, "where")


def test_haproxy_map_line() -> None:
    assert haproxy_map_line("alice/chat", "1") == "alice/chat 1\n"
    for key, value in [("a b", "1"), ("#a", "1"), ("a", "1\nb 2"), ("a", ""), ("", "1")]:
        with pytest.raises(ConfigError, match="m key|m value"):
            haproxy_map_line(key, value, "m")
