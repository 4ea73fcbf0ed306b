"""``gpunode rotate INV SECRET`` (gpunode/commands/rotate.py) for a secret under ``secrets:``:
a new version written to Vault with check-and-set, rolled out host by host (or by batches),
each host health-checked, a failing one put back on the old version, the rest left alone.

What is real: OpenBao (harness.start_bao) with KV v2 and an AppRole with the rotation's
policy; the secrets role, planned and executed through gpunode.commands.run with
deploys/rotate_secrets.py. What is not: the nodes. Their connector is pyinfra's ``@fake`` one
(harness's RecordingFakeConnector, which records every command and upload), and
:class:`Nodes` answers the health checks (``systemctl is-active``, ``curl`` of a health URL)
as each node's state says.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from harness import (
    Bao,
    RecordingFakeConnector,
    Response,
    fail_op,
    fake_clock,
    start_bao,
    stop_bao,
)
from pyinfra.api.exceptions import ConnectError

from gpunode.clients.vault import VaultError, close_all
from gpunode.commands import rotate as rot
from gpunode.commands import run
from gpunode.config import load
from gpunode.schema.node import Host

ROLE = "gpunode-rotate"
POLICY = (
    'path "secret/data/gpunode/*" { capabilities = ["create", "read", "update"] }\n'
    'path "secret/metadata/gpunode/*" { capabilities = ["read"] }\n'
    'path "secret/destroy/gpunode/*" { capabilities = ["update"] }\n'
)
HEALTH = "http://127.0.0.1:8080/health"


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bao]:
    server = start_bao(tmp_path_factory.mktemp("bao"))
    server.add_approle(ROLE, POLICY)
    yield server
    stop_bao(server)


@pytest.fixture
def login(bao: Bao, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A fresh secret_id in $VAULT_SECRET_ID (the rotation's and the role's login)."""
    monkeypatch.setenv("VAULT_SECRET_ID", bao.secret_id(ROLE))
    close_all()
    yield
    close_all()


@dataclass
class Nodes:
    """The nodes' answers: a unit in ``down`` is not active on that host; a host in
    ``unhealthy`` fails its health URL; a host in ``unreachable`` cannot be connected to."""

    down: dict[str, set[str]] = field(default_factory=dict)
    unhealthy: set[str] = field(default_factory=set)
    unreachable: set[str] = field(default_factory=set)  # SSH to these hosts is refused
    connectors: list[RecordingFakeConnector] = field(default_factory=list)

    def handler(self, connector: RecordingFakeConnector) -> Any:
        name = connector.host.name

        def handle(command: str) -> Response | None:
            if command.startswith("systemctl is-active --quiet "):
                unit = command.split()[-1]
                return {"success": unit not in self.down.get(name, set())}
            if command.startswith("curl -fsS -o /dev/null --max-time 5 "):
                return {"success": name not in self.unhealthy}
            return None

        return handle


def fake_nodes(monkeypatch: pytest.MonkeyPatch) -> Nodes:
    """Every host the rotation connects to is a fake one answered by a :class:`Nodes`."""
    nodes = Nodes()

    class Connector(RecordingFakeConnector):
        def __init__(self, state: Any, host: Any) -> None:
            super().__init__(state, host)
            self.handlers = [fail_op, nodes.handler(self)]
            nodes.connectors.append(self)

        def connect(self) -> None:
            if self.host.name in nodes.unreachable:
                raise ConnectError("Connection refused")
            super().connect()

    real = run.inventory_from

    def inventory_from(hosts: Any) -> Any:
        inv = real((n, {**d, "fake_delay": 0, "fake_delay_jitter": 0}) for n, d in hosts)
        for h in inv:
            h.connector_cls = Connector
        return inv

    monkeypatch.setattr(run, "inventory_from", inventory_from)
    return nodes


def deploy_groups(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The hosts of each deploy the rotation makes (one per batch), in order."""
    groups: list[list[str]] = []
    real_roll_out = rot._roll_out

    def roll_out(group, deploy_file, data, version, check):  # noqa: ANN001,ANN202
        groups.append([h.name for h in group])
        return real_roll_out(group, deploy_file, data, version, check)

    monkeypatch.setattr(rot, "_roll_out", roll_out)
    return groups


def put_secret(bao: Bao, tag: str) -> tuple[str, str]:
    """A fresh secret gpunode/rot-<tag> at version 1 (each test its own): path, value."""
    path = f"gpunode/rot-{tag}"
    value = f"old-{tag}-" + os.urandom(8).hex()
    bao.client().secrets.kv.v2.create_or_update_secret(path, {"api_key": value, "note": "kept"})
    return path, value


def inventory(bao: Bao, path: str, names: tuple[str, ...] = ("gpu-01", "gpu-02"), **secret):  # noqa: ANN003,ANN201
    hosts: list[Host] = list(
        load(inventory_doc(bao, path, names, **secret), "inv.yml").hosts.values()
    )
    return hosts


def inventory_doc(bao: Bao, path: str, names: tuple[str, ...], **secret: Any) -> dict[str, Any]:
    return {
        "defaults": {
            "distro": "debian12",
            "firewall": {"enabled": False},
            "vault": {"addr": bao.addr, "role_id": bao.role_id, "retries": 0},
            # a failing check gives up within seconds here, not the default minute
            "secrets": {"llm": {"path": path, "key": "api_key", "health_timeout": 5, **secret}},
        },
        "hosts": {
            name: {"connection": {"address": "127.0.0.1", "port": 22 + i}}
            for i, name in enumerate(names)
        },
    }


def tag_of(tmp_path: Path) -> str:
    return tmp_path.name[-20:].replace("_", "-").strip("-").lower()


def versions(bao: Bao, path: str) -> dict[str, Any]:
    return dict(bao.client().secrets.kv.v2.read_secret_metadata(path)["data"])


def latest(bao: Bao, path: str) -> dict[str, str]:
    kv = bao.client().secrets.kv.v2
    return dict(kv.read_secret_version(path, raise_on_deleted_version=True)["data"]["data"])


def written(connector: RecordingFakeConnector) -> str:
    """What the deploy uploaded to a host for the secret's file (the one upload)."""
    (text,) = [text for _, text in connector.uploads]
    return text


def seen_by_nodes(nodes: Nodes) -> str:
    parts = []
    for c in nodes.connectors:
        parts += [str(x) for x in c.executed_commands]
    return "\n".join(parts)


# --- rotations ------------------------------------------------------------------------------


def test_a_secret_is_rolled_out_host_by_host_each_checked(
    bao: Bao, login: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, old_value = put_secret(bao, tag_of(tmp_path))
    hosts = inventory(bao, path, restart=[{"name": "llm.service", "health_url": HEALTH}])
    nodes = fake_nodes(monkeypatch)
    said: list[str] = []
    rotation = rot.rotate(hosts, "llm", "new-value-1", destroy_old=True, say=said.append)

    assert rotation.ok, said
    assert (rotation.secret, rotation.old_version, rotation.new_version) == ("llm", 1, 2)
    assert rotation.destroyed == [1]
    assert latest(bao, path) == {"api_key": "new-value-1", "note": "kept"}
    assert versions(bao, path)["versions"]["1"]["destroyed"] is True
    assert said[0] == f"secret llm: wrote version 2 of secret/{path}#api_key (check-and-set on 1)"
    assert [line.split(": healthy")[0] for line in said[1:3]] == [
        "gpu-01: version 2",
        "gpu-02: version 2",
    ]
    for line in said[1:3]:
        assert line.startswith(
            (
                "gpu-01: version 2: healthy: llm.service healthy after ",
                "gpu-02: version 2: healthy: llm.service healthy after ",
            )
        )
        assert line.endswith(" s")
    assert said[3:] == [
        "secret llm: destroyed version 1",
        "secret llm: version 2 is on 2 host(s), all healthy",
    ]
    assert [r.host for r in rotation.results] == ["gpu-01", "gpu-02"]
    assert all(r.version == 2 and r.rolled_back_to is None for r in rotation.results)
    # one deploy per host (batch 1), each checked: the unit, then its health URL
    assert [c.host.name for c in nodes.connectors] == ["gpu-01", "gpu-02"]
    for c in nodes.connectors:
        commands = [str(x) for x in c.executed_commands]
        active = commands.index("systemctl is-active --quiet llm.service")
        assert commands[active + 1] == f"curl -fsS -o /dev/null --max-time 5 {HEALTH}"
    seen = seen_by_nodes(nodes) + "\n".join(said) + repr(rotation)
    assert "new-value-1" not in seen and old_value not in seen


def test_a_secret_without_services_is_written_and_batches_share_a_deploy(
    bao: Bao, login: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = put_secret(bao, tag_of(tmp_path))
    hosts = inventory(bao, path, names=("gpu-01", "gpu-02", "gpu-03"))
    nodes = fake_nodes(monkeypatch)
    groups = deploy_groups(monkeypatch)
    said: list[str] = []
    rotation = rot.rotate(hosts, "llm", "new-value-2", batch=2, say=said.append)

    assert rotation.ok and rotation.destroyed == []  # kept unless asked
    assert said[1:] == [
        "gpu-01: version 2: healthy: file written (no service to check)",
        "gpu-02: version 2: healthy: file written (no service to check)",
        "gpu-03: version 2: healthy: file written (no service to check)",
        "secret llm: version 2 is on 3 host(s), all healthy",
    ]
    assert not versions(bao, path)["versions"]["1"]["destroyed"]
    assert groups == [["gpu-01", "gpu-02"], ["gpu-03"]]  # a deploy per batch
    assert [(r.version, r.ok) for r in rotation.results] == [(2, True)] * 3
    assert sorted(c.host.name for c in nodes.connectors) == ["gpu-01", "gpu-02", "gpu-03"]
    assert "systemctl is-active" not in seen_by_nodes(nodes)


@pytest.mark.parametrize("rollback", [None, False])
def test_a_host_that_stays_unhealthy_fails_is_put_back_and_stops_the_rotation(
    bao: Bao,
    login: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    rollback: bool | None,
) -> None:
    path, old_value = put_secret(bao, tag_of(tmp_path))
    hosts = inventory(
        bao,
        path,
        names=("gpu-01", "gpu-02", "gpu-03"),
        restart=["llm.service", {"name": "proxy.service", "health_url": HEALTH}],
        health_timeout=1,
    )
    nodes = fake_nodes(monkeypatch)
    nodes.down = {"gpu-01": {"proxy.service"}}
    said: list[str] = []
    rotation = rot.rotate(
        hosts, "llm", "new-value-3", rollback=rollback, destroy_old=True, say=said.append
    )

    assert not rotation.ok
    assert said[1] == "gpu-01: version 2: FAILED: health check proxy.service failing after 1 s"
    failed = rotation.results[0]
    assert (failed.host, failed.version, failed.ok) == ("gpu-01", 2, False)
    if rollback is None:  # the secret's rollback: true (the default)
        assert said[2] == (
            "gpu-01: rolled back to version 1: STILL FAILING: health check proxy.service "
            "failing after 1 s"
        )
        assert failed.rolled_back_to is None  # still failing: not back
        assert [c.host.name for c in nodes.connectors] == ["gpu-01", "gpu-01"]
        # what the file got: the new value, then the old one back
        assert [written(c) for c in nodes.connectors] == [
            "API_KEY=new-value-3\n",
            f"API_KEY={old_value}\n",
        ]
    else:
        assert not any("rolled back" in line for line in said)
        assert [c.host.name for c in nodes.connectors] == ["gpu-01"]
    assert said[-1] == (
        "secret llm: rotation stopped at gpu-01; not touched: gpu-02, gpu-03; Vault's latest "
        "version is 2 (the next deploy rolls it out: fix the service, or write the old value "
        "back)"
    )
    assert len(rotation.results) == 1
    assert not versions(bao, path)["versions"]["1"]["destroyed"]  # the old one is kept


def test_a_host_healthy_again_on_the_old_version_is_rolled_back(
    bao: Bao, login: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The health URL fails while gpu-02 has the new version, passes once it is back on the
    old one: gpu-01 (first batch) keeps the new one, gpu-02 is back on version 1."""
    path, _ = put_secret(bao, tag_of(tmp_path))
    hosts = inventory(
        bao, path, restart=[{"name": "llm.service", "health_url": HEALTH}], health_timeout=1
    )
    nodes = fake_nodes(monkeypatch)
    real_roll_out = rot._roll_out

    def roll_out(group, deploy_file, data, version, check):  # noqa: ANN001,ANN202
        nodes.unhealthy = {"gpu-02"} if version == 2 else set()
        return real_roll_out(group, deploy_file, data, version, check)

    monkeypatch.setattr(rot, "_roll_out", roll_out)
    said: list[str] = []
    rotation = rot.rotate(hosts, "llm", "new-value-4", say=said.append)

    assert not rotation.ok
    assert said[1].startswith("gpu-01: version 2: healthy: llm.service healthy after ")
    assert said[2] == f"gpu-02: version 2: FAILED: health check {HEALTH} failing after 1 s"
    assert said[3].startswith("gpu-02: rolled back to version 1: healthy: llm.service healthy")
    assert said[4] == (
        "secret llm: rotation stopped at gpu-02; not touched: none; Vault's latest version is 2 "
        "(the next deploy rolls it out: fix the service, or write the old value back)"
    )
    assert [r.rolled_back_to for r in rotation.results] == [None, 1]
    assert [r.ok for r in rotation.results] == [True, False]


def test_a_failed_deploy_is_reported_and_the_rest_is_not_touched(
    bao: Bao, login: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = put_secret(bao, tag_of(tmp_path))
    hosts = inventory(bao, path, restart=["llm.service"])
    nodes = fake_nodes(monkeypatch)
    original = nodes.handler

    def handler(connector: RecordingFakeConnector) -> Any:
        answer = original(connector)

        def handle(command: str) -> Response | None:
            if command in ("systemctl start llm.service", "systemctl restart llm.service"):
                return {"success": False, "stderr": "Job for llm.service failed."}
            return answer(command)

        return handle

    monkeypatch.setattr(nodes, "handler", handler)
    said: list[str] = []
    rotation = rot.rotate(hosts, "llm", "new-value-5", rollback=False, say=said.append)

    assert not rotation.ok
    assert said[1] == "gpu-01: version 2: FAILED: the deploy failed (file or service restart)"
    assert [(r.host, r.version, r.ok) for r in rotation.results] == [("gpu-01", 2, False)]
    assert said[-1].startswith("secret llm: rotation stopped at gpu-01; not touched: gpu-02;")


def test_a_host_that_cannot_be_reached_is_named_with_its_error(
    bao: Bao, login: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = put_secret(bao, tag_of(tmp_path))
    hosts = inventory(bao, path)
    nodes = fake_nodes(monkeypatch)
    nodes.unreachable = {"gpu-01"}
    said: list[str] = []
    rotation = rot.rotate(hosts, "llm", "new-value-8", say=said.append)

    assert not rotation.ok
    assert said[1] == "gpu-01: version 2: FAILED: cannot connect: Connection refused"
    assert said[2] == (
        "gpu-01: rolled back to version 1: STILL FAILING: cannot connect: Connection refused"
    )
    assert said[-1].startswith("secret llm: rotation stopped at gpu-01; not touched: gpu-02;")


def test_vault_gone_mid_rotation_stops_before_the_next_host(
    bao: Bao, login: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deploy cannot read the new version (here: it was destroyed by someone meanwhile):
    nothing of that batch is deployed, and no later host is touched."""
    path, _ = put_secret(bao, tag_of(tmp_path))
    hosts = inventory(bao, path)
    nodes = fake_nodes(monkeypatch)
    real_roll_out = rot._roll_out

    def roll_out(group, deploy_file, data, version, check):  # noqa: ANN001,ANN202
        bao.client().secrets.kv.v2.destroy_secret_versions(path, versions=[version])
        return real_roll_out(group, deploy_file, data, version, check)

    monkeypatch.setattr(rot, "_roll_out", roll_out)
    said: list[str] = []
    rotation = rot.rotate(hosts, "llm", "new-value-6", say=said.append)

    assert not rotation.ok
    assert [(r.host, r.version, r.ok, r.detail) for r in rotation.results] == [
        ("gpu-01", 2, False, "not touched"),
        ("gpu-02", 2, False, "not touched"),
    ]
    assert said[-1].startswith("secret llm: rotation stopped: secret llm (")
    assert said[-1].endswith(
        "; not touched: gpu-01, gpu-02; Vault's latest version is 2 (the next deploy rolls it out)"
    )
    assert "/etc/gpunode/secrets/llm.env" not in seen_by_nodes(nodes)  # nothing written


def test_a_destroy_vault_refuses_names_the_secret_after_the_roll_out(
    bao: Bao, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--destroy-old with a policy that does not grant it: the one host has the new version,
    and the error names the secret and the version it could not destroy."""
    role = "no-destroy"
    c = bao.client()
    c.sys.create_or_update_policy(role, POLICY.replace("destroy", "nothing"))
    c.auth.approle.create_or_update_approle(role, token_policies=[role])
    monkeypatch.setenv("VAULT_SECRET_ID", bao.secret_id(role))
    monkeypatch.setattr(bao, "role_id", c.auth.approle.read_role_id(role)["data"]["role_id"])
    close_all()
    path, _ = put_secret(bao, tag_of(tmp_path))
    hosts = inventory(bao, path, names=("gpu-01",))
    fake_nodes(monkeypatch)
    said: list[str] = []
    try:
        with pytest.raises(VaultError) as err:
            rot.rotate(hosts, "llm", "new-value-7", destroy_old=True, say=said.append)
    finally:
        close_all()
    assert str(err.value).startswith(
        f"secret llm (secret/{path}) destroy versions [1]: permission denied by Vault"
    )
    assert said[1].startswith("gpu-01: version 2: healthy: ")
    assert latest(bao, path)["api_key"] == "new-value-7"


# --- refusals and the CLI ---------------------------------------------------------------------


def test_a_batch_below_one_is_refused(bao: Bao, tmp_path: Path) -> None:
    path, _ = put_secret(bao, tag_of(tmp_path))
    with pytest.raises(rot.RotateError) as err:
        rot.rotate(inventory(bao, path), "llm", "v", batch=0, say=print)
    assert str(err.value) == "--batch 0: allowed: 1 or more"
    assert versions(bao, path)["current_version"] == 1  # nothing written


def test_hosts_with_other_vault_settings_are_refused(bao: Bao, tmp_path: Path) -> None:
    path, _ = put_secret(bao, tag_of(tmp_path))
    hosts = inventory(bao, path)
    other = hosts[1].config.vault.model_copy(update={"retries": 5})
    hosts[1] = hosts[1].model_copy(
        update={"config": hosts[1].config.model_copy(update={"vault": other})}
    )
    with pytest.raises(rot.RotateError) as err:
        rot.rotate(hosts, "llm", "v", say=print)
    assert str(err.value) == "secret llm: host gpu-02 has other vault settings than gpu-01"


def test_the_cli_says_why_in_one_line_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inv = tmp_path / "inv.yml"
    inv.write_text(
        "defaults:\n  distro: debian12\n  firewall: {enabled: false}\n"
        "  vault: {addr: 'http://127.0.0.1:1'}\n"
        "  secrets:\n    llm: {path: gpunode/llm, key: api_key}\n"
        "hosts:\n  gpu-01:\n    connection: {address: 192.0.2.1}\n"
    )
    assert rot.main(str(inv), "nope", "v") == 1
    assert capsys.readouterr().out == (
        "gpunode rotate: secret nope: no host declares it (allowed: llm)\n"
    )


def test_the_cli_entry_passes_its_options_and_exits_0_only_when_all_are_healthy(
    bao: Bao,
    login: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, _ = put_secret(bao, tag_of(tmp_path))
    names = ("gpu-01", "gpu-02", "gpu-03")
    doc = inventory_doc(
        bao, path, names, restart=[{"name": "llm.service", "health_url": HEALTH}], health_timeout=1
    )
    fleet = tmp_path / "fleet.yml"
    fleet.write_text(json.dumps(doc))  # YAML is a superset of JSON
    nodes = fake_nodes(monkeypatch)
    groups = deploy_groups(monkeypatch)
    assert rot.main(str(fleet), "llm", "new-value-9", batch=2) == 0
    assert groups == [["gpu-01", "gpu-02"], ["gpu-03"]]
    assert capsys.readouterr().out.splitlines()[-1] == (
        "secret llm: version 2 is on 3 host(s), all healthy"
    )
    nodes.unhealthy = {"gpu-01"}
    assert rot.main(str(fleet), "llm", "new-value-10", rollback=False) == 1
    assert (
        capsys.readouterr()
        .out.splitlines()[-1]
        .startswith("secret llm: rotation stopped at gpu-01; not touched: gpu-02, gpu-03;")
    )
    assert rot.main(str(fleet), "other", "new-value-11") == 1
    assert capsys.readouterr().out == (
        "gpunode rotate: secret other: no host declares it (allowed: llm)\n"
    )


def test_an_unknown_secret_names_every_declared_one() -> None:
    doc = {
        "defaults": {
            "distro": "debian12",
            "firewall": {"enabled": False},
            "vault": {"addr": "http://127.0.0.1:1", "role_id": "r"},
            "secrets": {n: {"path": f"gpunode/{n}", "key": "k"} for n in ("llm", "db")},
        },
        "hosts": {"gpu-01": {"connection": {"address": "127.0.0.1"}}},
    }
    hosts = list(load(doc, "inv.yml").hosts.values())
    with pytest.raises(rot.RotateError) as err:
        rot.secret_hosts(hosts, "other")
    assert str(err.value) == "secret other: no host declares it (allowed: db, llm)"


class _Checked:
    """A host for _wait_healthy: each check command fails until ``passes_at`` (a time on the
    fake clock); every command run is kept with the time it ran at."""

    name = "gpu-01"

    def __init__(self, clock: list[float], passes_at: float) -> None:
        self.clock, self.passes_at = clock, passes_at
        self.ran: list[tuple[float, str]] = []

    def run_shell_command(self, command: Any) -> tuple[bool, None]:
        self.ran.append((self.clock[0], str(command)))
        return self.clock[0] >= self.passes_at, None


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """_wait_healthy's own clock, starting at 1000 s: its waits pass at once."""
    return fake_clock(monkeypatch, rot, start=1000.0)


def _secret(**settings: Any) -> Any:
    from gpunode.schema.vault import Secret

    restart = ["llm.service", {"name": "proxy.service", "health_url": HEALTH}]
    return Secret(path="gpunode/x", key="k", restart=restart, **settings)


def test_a_host_healthy_after_some_checks_reports_how_long_it_took(clock: list[float]) -> None:
    host = _Checked(clock, passes_at=1001.5)
    result = rot._wait_healthy(host, _secret(health_timeout=5), 7)
    assert result == rot.HostResult(
        "gpu-01", 7, True, "llm.service, proxy.service healthy after 1.5 s"
    )
    # a check every 0.5 s; each round stops at its first failing check
    assert [t for t, _ in host.ran] == [1000.0, 1000.5, 1001.0, 1001.5, 1001.5, 1001.5]
    assert [c for _, c in host.ran[-3:]] == [
        "systemctl is-active --quiet llm.service",
        "systemctl is-active --quiet proxy.service",
        f"curl -fsS -o /dev/null --max-time 5 {HEALTH}",
    ]


def test_a_host_never_healthy_is_checked_until_its_timeout_has_passed(clock: list[float]) -> None:
    host = _Checked(clock, passes_at=float("inf"))
    result = rot._wait_healthy(host, _secret(health_timeout=2), 7)
    assert result == rot.HostResult(
        "gpu-01", 7, False, "health check llm.service failing after 2 s"
    )
    assert [t for t, _ in host.ran] == [1000.0, 1000.5, 1001.0, 1001.5, 1002.0, 1002.5]


def test_a_secret_with_metadata_and_no_version_yet_gets_version_1(
    bao: Bao, login: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Metadata written ahead (``kv metadata put``, e.g. to set max_versions) and no version:
    the first one is written with check-and-set 0, and there is nothing to put back."""
    path = f"gpunode/rot-{tag_of(tmp_path)}"
    bao.client().secrets.kv.v2.update_metadata(path, max_versions=5)
    hosts = inventory(bao, path, names=("gpu-01",))
    fake_nodes(monkeypatch)
    said: list[str] = []
    rotation = rot.rotate(hosts, "llm", "first-value", say=said.append)
    assert said[0] == f"secret llm: wrote version 1 of secret/{path}#api_key (check-and-set on 0)"
    assert (rotation.ok, rotation.old_version, rotation.new_version) == (True, 0, 1)
    assert latest(bao, path) == {"api_key": "first-value"}


def test_a_batch_with_a_host_that_cannot_be_planned_deploys_none_of_it(
    bao: Bao, login: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch is all or nothing: gpu-02's deploy cannot be planned, so gpu-01, in the same
    batch, is not deployed either (and nothing is written anywhere)."""
    from pyinfra import host
    from pyinfra.api.exceptions import OperationError

    import roles.secrets

    path, _ = put_secret(bao, tag_of(tmp_path))
    hosts = inventory(bao, path, names=("gpu-01", "gpu-02"))
    nodes = fake_nodes(monkeypatch)
    real = roles.secrets.secrets

    def secrets(*args: Any, **kwargs: Any) -> Any:
        if host.name == "gpu-02":
            raise OperationError("planted: gpu-02 cannot be planned")
        return real(*args, **kwargs)

    monkeypatch.setattr(roles.secrets, "secrets", secrets)
    said: list[str] = []
    rotation = rot.rotate(hosts, "llm", "new-value-12", batch=2, rollback=False, say=said.append)
    assert said[1:3] == [
        "gpu-01: version 2: FAILED: not run: planning failed on gpu-02",
        "gpu-02: version 2: FAILED: planning failed: planted: gpu-02 cannot be planned",
    ]
    assert not rotation.ok
    assert all(not c.uploads for c in nodes.connectors)


def test_a_writer_between_the_version_read_and_the_write_stops_the_rotation(
    bao: Bao, login: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone writes version 2 after the rotation read version 1 as the latest: the
    rotation's check-and-set write on 1 is refused, naming the secret, and their value stays."""
    from gpunode.clients.vault import Session

    path, _ = put_secret(bao, tag_of(tmp_path))
    hosts = inventory(bao, path, names=("gpu-01",))
    fake_nodes(monkeypatch)
    real_metadata = Session.metadata

    def metadata(self: Session, *args: Any) -> Any:
        meta = real_metadata(self, *args)
        bao.client().secrets.kv.v2.create_or_update_secret(path, {"api_key": "theirs"})
        return meta

    monkeypatch.setattr(Session, "metadata", metadata)
    with pytest.raises(VaultError) as err:
        rot.rotate(hosts, "llm", "mine", say=print)
    assert str(err.value) == (
        f"secret llm (secret/{path}#api_key): someone wrote a newer version than 1 meanwhile "
        "(check-and-set failed); run the rotation again"
    )
    assert latest(bao, path) == {"api_key": "theirs"}


def test_vault_gone_before_the_second_batch_keeps_the_first_batchs_results(
    bao: Bao, login: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = put_secret(bao, tag_of(tmp_path))
    hosts = inventory(bao, path, names=("gpu-01", "gpu-02"))
    fake_nodes(monkeypatch)
    real_roll_out = rot._roll_out

    def roll_out(group, deploy_file, data, version, check):  # noqa: ANN001,ANN202
        if group[0].name == "gpu-02":
            bao.client().secrets.kv.v2.destroy_secret_versions(path, versions=[version])
        return real_roll_out(group, deploy_file, data, version, check)

    monkeypatch.setattr(rot, "_roll_out", roll_out)
    rotation = rot.rotate(hosts, "llm", "new-value-13", say=lambda line: None)
    assert [(r.host, r.ok, r.detail) for r in rotation.results] == [
        ("gpu-01", True, "file written (no service to check)"),
        ("gpu-02", False, "not touched"),
    ]


def test_every_failing_host_of_a_batch_is_named(
    bao: Bao, login: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = put_secret(bao, tag_of(tmp_path))
    hosts = inventory(bao, path, names=("gpu-01", "gpu-02", "gpu-03"), restart=["llm.service"])
    nodes = fake_nodes(monkeypatch)
    nodes.down = {"gpu-01": {"llm.service"}, "gpu-02": {"llm.service"}}
    fake_clock(monkeypatch, rot)  # the failing checks' minute passes at once
    said: list[str] = []
    rot.rotate(hosts, "llm", "new-value-14", batch=2, rollback=False, say=said.append)
    assert said[-1] == (
        "secret llm: rotation stopped at gpu-01, gpu-02; not touched: gpu-03; Vault's latest "
        "version is 2 (the next deploy rolls it out: fix the service, or write the old value "
        "back)"
    )
