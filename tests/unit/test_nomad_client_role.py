"""Operation tests of the Nomad client role (roles/nomad_client.py) on every distro.

No Nomad package or binary can be installed here (HashiCorp's repositories are not
reachable), so the role runs through pyinfra's real API against pyinfra's ``@fake``
connector, with the harness of harness.py: the commands pyinfra would send and
the files it would upload are asserted on. HashiCorp's signing key is pinned: the
commands that read a keyring on the host (the ``Keyring`` fact, the check right after a
download) run for real with this machine's ``gpg`` on keyrings made by tests/unit/gpgkeys.py,
with the pin pointed at the throwaway key (a keyring with it plus another key must fail).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from gpgkeys import Keyrings, make_keyrings, run_real
from harness import ALL, APT, DNF, Handler, Run, converged, host_info_output, run_deploys

from gpunode import nomad as hashicorp
from gpunode import provenance
from gpunode.config import load
from gpunode.facts.server import HostInfo
from gpunode.nomad import REPO, cluster_ports
from gpunode.schema.node import NodeConfig
from gpunode.schema.types import ConfigError
from roles.nomad_client import nomad_client

HOST = "gpu-01"
SHA = "a" * 64
SERVERS = ["10.0.0.10:4647", "10.0.0.11:4647"]
CONFIG = "/etc/nomad.d/nomad.hcl"
UNIT = "/etc/systemd/system/nomad.service"
APT_LIST = "/etc/apt/sources.list.d/hashicorp.list"
DNF_REPO = "/etc/yum.repos.d/hashicorp.repo"
KEYRING = "/usr/share/keyrings/hashicorp-archive-keyring.asc"
RPM_KEY = "/etc/pki/rpm-gpg/RPM-GPG-KEY-gpunode-hashicorp"
HASHICORP = "798AEC654E5C15428C8E42EEAA16FCBCA621E701"  # written out: a wrong pin fails here
CODENAMES = {"debian12": "bookworm", "ubuntu2204": "jammy", "ubuntu2404": "noble"}


def node_config(distro: str, **nomad: Any) -> NodeConfig:
    settings: dict[str, Any] = {
        "enabled": True,
        "version": "1.10.5",
        "datacenter": "gpu-dc1",
        "servers": SERVERS,
        "device_plugin": {"sha256": SHA},
        "vault_address": "https://vault.example.com:8200",
    }
    settings.update(nomad)
    raw = {
        # the firewall (on by default) is the firewall role's: not this role's concern
        "defaults": {"distro": distro, "nomad": settings, "firewall": {"enabled": False}},
        "hosts": {HOST: {"connection": {"address": "192.0.2.10"}}},
    }
    return load(raw, source="test_nomad_client_role").hosts[HOST].config


def run_role(config: NodeConfig, distro: str, handlers: tuple = ()) -> Run:
    responses: dict[Any, Any] = {
        HostInfo().command(): list(host_info_output(distro)),
    }
    return run_deploys(config, responses, [nomad_client], handlers, host_name=HOST)


def nomad_running(command: str) -> Any:
    """systemd's answers on a host where the Nomad unit is enabled and running."""
    if re.search(r"systemctl show .*--property SubState nomad\.service", command):
        return ["Id=nomad.service", "SubState=running"]
    if re.search(r"systemctl show .*--property UnitFileState nomad\.service", command):
        return ["Id=nomad.service", "UnitFileState=enabled"]
    return None


ZIP = "/var/lib/gpunode/nomad/nomad-device-nvidia_1.1.0.zip"
PLUGIN = "/opt/nomad/data/plugins/nomad-device-nvidia"


def downloaded(files: dict[str, tuple[str, str]]) -> Any:
    """A host that already has these downloaded files (path -> (mode, sha256)): answers
    pyinfra's File and Sha256File facts for them."""

    def handler(command: str) -> Any:
        if m := re.match(r"! \(test -e (\S+) \|\| test -L \1 \) \|\| \( stat -c ", command):
            if m[1] in files:
                mode = "-" + "".join(
                    c if int(files[m[1]][0], 8) & (1 << (8 - i)) else "-"
                    for i, c in enumerate("rwxrwxrwx")
                )
                return f"user=root group=root mode={mode} atime=0 mtime=0 ctime=0 size=1 '{m[1]}'"
        elif m := re.match(r"test -e (\S+) && \( sha256sum \1 ", command):
            if m[1] in files:
                return f"{files[m[1]][1]}  {m[1]}"
        return None

    return handler


def dpkg_installed(packages: dict[str, str]) -> Any:
    """`dpkg -l` on a host with these packages (name -> version), in dpkg's own format."""

    def handler(command: str) -> Any:
        if re.search(r"\bdpkg -l\b", command):
            return [f"ii  {n}  {v}  amd64  (description)" for n, v in packages.items()]
        return None

    return handler


def hcl_value(text: str, key: str) -> str:
    m = re.search(rf"^\s*{key}\s*=\s*(.+)$", text, re.M)
    assert m, f"{key} not in config"
    return m[1].strip()


def key_checks(run: Run, path: str) -> list[str]:
    """Commands that check the keyring at ``path`` with gpg on the host (not the fact that
    reads it at plan time)."""
    return [c for c in run.commands if "gpg " in c and path in c and not c.startswith("if [")]


def chmod_of(run: Run, path: str) -> int:
    """Where a file the role writes lands in the command sequence (its chmod follows it)."""
    return run.commands.index(f"chmod 644 {path}")


@pytest.mark.parametrize("distro", APT)
def test_apt_repository_key_and_pinned_package(distro: str) -> None:
    run = run_role(node_config(distro), distro)
    assert not run.failed
    lines = [ln for ln in run.files[APT_LIST].splitlines() if ln and not ln.startswith("#")]
    assert lines == [
        f"deb [signed-by={KEYRING}] https://apt.releases.hashicorp.com {CODENAMES[distro]} main"
    ]
    assert hashicorp.HASHICORP_KEY_FINGERPRINTS == (HASHICORP,)
    # gpg first, then the key from the repository, checked on the host (exactly HashiCorp's
    # key) before the repository file is written and anything is installed from it
    (gpg,) = run.grep(r"apt-get .*install.* gpg$")
    (download,) = run.grep(r"curl -sSLf https://apt\.releases\.hashicorp\.com/gpg -o ")
    (check,) = key_checks(run, KEYRING)
    assert HASHICORP in check
    order = [run.commands.index(c) for c in (gpg, download, check)]
    assert order == sorted(order) and order[-1] < chmod_of(run, APT_LIST)
    installs = run.grep(r"apt-get .*install .*nomad")
    assert len(installs) == 1 and "nomad=1.10.5-1" in installs[0].split()
    assert run.commands.index(check) < run.commands.index(installs[0])
    assert run.grep(r"apt-get .*update")  # the new repository is read before installing


@pytest.mark.parametrize("distro", DNF)
def test_dnf_repository_and_pinned_package(distro: str) -> None:
    run = run_role(node_config(distro), distro)
    assert not run.failed
    repo = run.files[DNF_REPO]
    assert "baseurl=https://rpm.releases.hashicorp.com/RHEL/$releasever/$basearch/stable" in repo
    # dnf imports the key from gpunode's pinned copy, never from a URL (trust on first use)
    assert "gpgcheck=1" in repo and f"gpgkey=file://{RPM_KEY}" in repo
    assert "gpgkey=http" not in repo
    (download,) = run.grep(r"curl -sSLf https://rpm\.releases\.hashicorp\.com/gpg -o ")
    (check,) = key_checks(run, RPM_KEY)
    assert HASHICORP in check
    assert run.commands.index(download) < run.commands.index(check) < chmod_of(run, DNF_REPO)
    installs = run.grep(r"^dnf .*install.*nomad")
    assert len(installs) == 1 and "nomad-1.10.5-1" in installs[0].split()
    assert not run.grep("apt-get")


@pytest.mark.parametrize("distro", ["debian12", "rocky9"])
def test_mirror_url_replaces_hashicorp(distro: str) -> None:
    config = node_config(
        distro, repo_url="http://mirror.internal/hashicorp/", repo_url_allow_http=True
    )
    run = run_role(config, distro)
    text = "\n".join([*run.files.values(), *run.commands])
    assert "hashicorp//" not in text  # the trailing slash is dropped
    assert "http://mirror.internal/hashicorp/" in text
    assert run.grep(r"curl -sSLf http://mirror\.internal/hashicorp/gpg -o ")  # still pinned
    assert "releases.hashicorp.com" not in "\n".join(run.files.values())
    # plain http is allowed by the flag and said on every run
    assert any("HashiCorp repository over plain http" in label for label in run.op_labels)


def test_file_mirror_is_accepted_without_a_flag() -> None:
    run = run_role(node_config("debian12", repo_url="file:///srv/mirror/hashicorp"), "debian12")
    assert not run.failed
    assert run.grep(r"curl -sSLf file:///srv/mirror/hashicorp/gpg -o ")
    assert not any("plain http" in label for label in run.op_labels)


def test_plain_http_mirror_needs_its_flag() -> None:
    with pytest.raises(ConfigError) as err:
        node_config("debian12", repo_url="http://mirror.internal/hashicorp")
    assert str(err.value) == (
        "test_nomad_client_role: defaults: nomad.repo_url: 'http://mirror.internal/hashicorp' "
        "is plain http (allowed: https:// or file:///, or nomad.repo_url_allow_http: true "
        "beside it for a mirror that only speaks http, warned about on every run)"
    )


@pytest.mark.parametrize("distro", ALL)
def test_client_config(distro: str) -> None:
    conf = run_role(node_config(distro), distro).files[CONFIG]
    assert hcl_value(conf, "datacenter") == '"gpu-dc1"'
    assert hcl_value(conf, "servers") == '["10.0.0.10:4647", "10.0.0.11:4647"]'
    assert hcl_value(conf, "plugin_dir") == '"/opt/nomad/data/plugins"'
    acl = re.search(r"^acl \{\n  enabled = true\n\}$", conf, re.M)
    assert acl, conf
    tls = re.search(r"^tls \{\n(.*?)^\}", conf, re.M | re.S)
    assert tls, conf
    assert {k: hcl_value(tls[1], k) for k in ("http", "rpc", "verify_https_client")} == {
        "http": "true",
        "rpc": "true",
        "verify_https_client": "true",
    }
    assert hcl_value(tls[1], "key_file") == '"/etc/nomad.d/tls/client-key.pem"'
    plugin = re.search(r'^plugin "nomad-device-nvidia" \{\n(.*?)^\}', conf, re.M | re.S)
    assert plugin and hcl_value(plugin[1], "enabled") == "true"
    assert hcl_value(plugin[1], "fingerprint_period") == '"1m"'
    assert hcl_value(conf, "jwt_auth_backend_path") == '"jwt-nomad"'
    assert re.search(r"^server \{\n  enabled = false\n\}$", conf, re.M)


def test_config_without_tls_or_plugin() -> None:
    config = node_config("debian12", tls={"enabled": False}, device_plugin={"enabled": False})
    run = run_role(config, "debian12")
    conf = run.files[CONFIG]
    assert "tls {" not in conf and "nomad-device-nvidia" not in conf
    assert not run.grep("nomad-device-nvidia")


@pytest.mark.parametrize("distro", ["debian12", "alma9"])
def test_device_plugin_checked_by_sha256(distro: str) -> None:
    run = run_role(node_config(distro, device_plugin={"sha256": SHA, "version": "1.1.0"}), distro)
    url = "https://releases.hashicorp.com/nomad-device-nvidia/1.1.0/nomad-device-nvidia_1.1.0_linux_amd64.zip"
    downloads = run.grep(re.escape(url))
    assert downloads, run.commands
    assert any(SHA in c and "sha256sum" in c for c in run.commands)
    assert run.grep(r"^unzip -o -q /var/lib/gpunode/nomad/nomad-device-nvidia_1\.1\.0\.zip ")
    assert run.grep(r"chmod 755 /opt/nomad/data/plugins/nomad-device-nvidia$")


@pytest.mark.parametrize("distro", ["ubuntu2404", "rhel9"])
def test_hardened_unit_started_and_enabled(distro: str) -> None:
    run = run_role(node_config(distro), distro)
    unit = run.files[UNIT]
    settings = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#")
    )
    assert settings["ExecStart"] == "/usr/bin/nomad agent -config /etc/nomad.d"
    assert settings["KillMode"] == "process"  # allocations survive an agent restart
    for key in ("ProtectKernelModules", "ProtectKernelLogs", "ProtectClock", "PrivateTmp"):
        assert settings[key] == "yes", key
    assert settings["ProtectSystem"] == "full"
    assert "PrivateDevices" not in settings  # /dev/nvidia* must stay visible
    assert run.grep(r"^systemctl daemon-reload$")
    assert run.grep(r"^systemctl start nomad\.service$")
    assert run.grep(r"^systemctl enable nomad\.service$")


@pytest.fixture(scope="module")
def keyrings(tmp_path_factory: pytest.TempPathFactory) -> Keyrings:
    return make_keyrings(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def pinned(keyrings: Keyrings, monkeypatch: pytest.MonkeyPatch) -> Keyrings:
    """HashiCorp's pin pointed at the throwaway key A (the old name too: the regression test
    below also runs against the code before the pin table)."""
    monkeypatch.setattr(hashicorp, "HASHICORP_KEY_FINGERPRINTS", (keyrings.pinned,), raising=False)
    monkeypatch.setattr(hashicorp, "HASHICORP_KEY_FINGERPRINT", keyrings.pinned, raising=False)
    return keyrings


def keyring_on_host(path: str, local: Path) -> Handler:
    """A host whose keyring ``path`` is the local file: every command that reads it with gpg
    (the Keyring fact, the check) runs for real on that file."""

    def handler(command: str) -> Any:
        if "gpg " in command and path in command:
            proc = run_real(command, path, local)
            return {"success": proc.returncode == 0, "stdout": proc.stdout, "stderr": proc.stderr}
        return None

    return handler


def converged_debian(keyring: Path) -> tuple:
    first = run_role(node_config("debian12"), "debian12")
    modes = {m[2]: m[1] for c in first.commands if (m := re.match(r"chmod (\d+) (\S+)$", c))}
    host = converged(first.files, modes)
    on_disk = downloaded({ZIP: ("600", SHA), KEYRING: ("644", "-"), PLUGIN: ("755", "-")})
    debs = dpkg_installed({"nomad": "1.10.5-1", "unzip": "6.0-28", "gpg": "2.2.40-1.1"})
    return (keyring_on_host(KEYRING, keyring), on_disk, debs, host, nomad_running)


def test_converged_host_changes_nothing(pinned: Keyrings) -> None:
    handlers = converged_debian(pinned.files["exact"])
    again = run_role(node_config("debian12"), "debian12", handlers=handlers)
    assert not again.failed
    assert again.uploads == []
    assert not again.grep(r"systemctl (daemon-reload|restart|start|enable)")
    assert not again.grep(r"curl|wget|^unzip")  # downloads are checked, not repeated
    assert not again.grep(r"apt-get")  # no list refresh, no install
    # the keyring was read (a fact: no change), and found to be exactly the pinned key
    (read,) = [c for c in again.commands if "gpg " in c and KEYRING in c]
    assert read.startswith(f"if [ -e {KEYRING} ]")


def test_version_change_refreshes_lists_and_installs_the_pin() -> None:
    debs = dpkg_installed({"nomad": "1.10.4-1", "unzip": "6.0-28"})
    run = run_role(node_config("debian12", version="1.10.5"), "debian12", handlers=(debs,))
    assert run.grep(r"apt-get .*update")
    (install,) = run.grep(r"apt-get .*install .*nomad")
    assert "nomad=1.10.5-1" in install.split() and "--allow-downgrades" in install


def test_config_change_restarts_nomad_only() -> None:
    first = run_role(node_config("debian12"), "debian12")
    modes = {m[2]: m[1] for c in first.commands if (m := re.match(r"chmod (\d+) (\S+)$", c))}
    host = converged(first.files, modes)
    changed = run_role(
        node_config("debian12", datacenter="gpu-dc2"), "debian12", handlers=(host, nomad_running)
    )
    assert list(changed.files) == [CONFIG]
    assert changed.grep(r"^systemctl restart nomad\.service$")
    assert not changed.grep(r"systemctl daemon-reload")


def test_disabled_does_nothing() -> None:
    run = run_role(node_config("debian12", enabled=False, servers=[]), "debian12")
    assert run.uploads == [] and not run.grep("nomad")


def test_labels_carry_no_config_values() -> None:
    config = node_config(
        "debian12", repo_url="http://mirror.secret.example/hc", repo_url_allow_http=True
    )
    run = run_role(config, "debian12")
    leaks = [
        label
        for label in run.op_labels
        for value in ("mirror.secret.example", "10.0.0.10", "gpu-dc1", SHA)
        if value in label
    ]
    assert leaks == []


def test_provenance_records_versions_not_secrets() -> None:
    run_role(node_config("debian12"), "debian12")
    assert provenance.recorded(f"@fake/{HOST}")["nomad"] == {
        "version": "1.10.5",
        "device_plugin": "1.1.0",
        "device_plugin_sha256": SHA,
    }


# --- the signing key, pinned: the checks on the host, with real gpg ---------------------------


@pytest.mark.parametrize("name, accepted", [("exact", True), ("extra", False), ("other", False)])
def test_downloaded_key_is_checked_for_exactly_the_pinned_key(
    pinned: Keyrings, tmp_path: Path, name: str, accepted: bool
) -> None:
    """Finding 7: the check after the download refuses HashiCorp's key plus another one
    (apt would trust every key in the file), removing the file."""
    run = run_role(node_config("debian12"), "debian12")
    checks = [c for c in run.commands if "gpg " in c and KEYRING in c and pinned.pinned in c]
    assert len(checks) == 1, run.commands
    local = tmp_path / "keyring.asc"
    local.write_bytes(pinned.files[name].read_bytes())
    proc = run_real(checks[0], KEYRING, local)
    assert (proc.returncode == 0) is accepted, proc.stderr
    assert local.exists() is accepted  # a refused key is removed: apt never reads it


def test_keyring_with_an_extra_key_stops_the_run_before_the_repository(pinned: Keyrings) -> None:
    """Finding 7, every run: a keyring already on the host (the fact reads it on every run,
    not only after a download) with another key beside HashiCorp's fails the host before
    the repository file is written or anything is installed."""
    handlers = converged_debian(pinned.files["extra"])
    run = run_role(node_config("debian12"), "debian12", handlers=handlers)
    assert run.failed
    (failure,) = [out for _cmd, ok, out in run.results if not ok]
    found = ", ".join(sorted([pinned.pinned, pinned.other]))
    assert failure.stderr.strip() == (
        f"gpunode: host @fake/{HOST}: {KEYRING} holds primary keys {found}; expected exactly "
        f"{pinned.pinned} (allowed: a keyring with only the pinned keys: remove the file and "
        "run again to download it, or fix the pin in gpunode's tables if the publisher "
        "rotated its key)"
    )
    assert run.uploads == []
    assert not run.grep(r"apt-get|curl|wget|systemctl|unzip|chmod")


def test_keyring_on_a_dnf_host_is_checked_the_same_way(pinned: Keyrings) -> None:
    run = run_role(
        node_config("rocky9"), "rocky9", handlers=(keyring_on_host(RPM_KEY, pinned.files["other"]),)
    )
    assert run.failed
    assert run.uploads == [] and not run.grep(r"^dnf |curl")


# --- config errors and ports ------------------------------------------------------------------


def test_missing_servers_and_plugin_checksum_are_config_errors() -> None:
    with pytest.raises(ConfigError) as exc:
        node_config("debian12", servers=[], device_plugin={"sha256": None})
    message = str(exc.value)
    assert f"host {HOST}: nomad.servers: not set" in message
    assert "nomad.device_plugin.sha256: not set" in message


def test_bad_duration_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"nomad\.policy\.healthy_deadline: '15 minutes'"):
        node_config("debian12", policy={"healthy_deadline": "15 minutes"})


def test_bad_version_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"nomad\.version: '1\.10' is not allowed"):
        node_config("debian12", version="1.10")


def test_cluster_ports() -> None:
    assert cluster_ports(node_config("debian12")) == [("tcp", 4646), ("tcp", 4647)]
    assert cluster_ports(node_config("debian12", serf=True)) == [
        ("tcp", 4646),
        ("tcp", 4647),
        ("tcp", 4648),
        ("udp", 4648),
    ]
    assert cluster_ports(node_config("debian12", enabled=False, servers=[])) == []


def test_repo_table_pins() -> None:
    assert REPO["apt"].package("1.10.5") == "nomad=1.10.5-1"
    assert REPO["dnf"].package("1.10.5") == "nomad-1.10.5-1"


# --- the unit, checked by this machine's systemd ----------------------------------------------

UPSTREAM_UNIT = Path(__file__).parent / "fixtures" / "nomad" / "nomad.service.upstream"


def _offline(unit_text: str, directory: Path) -> tuple[subprocess.CompletedProcess, float]:
    directory.mkdir()
    path = directory / "nomad.service"
    # /usr/bin/nomad is not installed here; verify checks that ExecStart exists
    path.write_text(unit_text.replace("/usr/bin/nomad", "/bin/sleep"))
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(path)], capture_output=True, text=True
    )
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(path)],
        capture_output=True,
        text=True,
    )
    m = re.search(r"Overall exposure level for nomad\.service: ([0-9.]+)", security.stdout)
    assert m, security.stdout + security.stderr
    return verify, float(m[1])


def test_unit_verifies_and_is_less_exposed_than_the_packages(tmp_path: Path) -> None:
    unit = run_role(node_config("debian12"), "debian12").files[UNIT]
    verify, ours = _offline(unit, tmp_path / "ours")
    # systemd-analyze verify exits 0 on unknown keys and only warns: any output fails
    assert (verify.returncode, verify.stdout, verify.stderr) == (0, "", "")
    _, upstream = _offline(UPSTREAM_UNIT.read_text(), tmp_path / "upstream")
    assert upstream == 9.6  # the package's own unit, as shipped
    assert ours <= 8.0, ours
