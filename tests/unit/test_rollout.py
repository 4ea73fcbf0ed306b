"""gpunode rollout (gpunode/commands/rollout.py): the batch order, the report, the ssh argv,
the health checks, the deploy as run in this process, the model links and the revert.

What is real here and what is not:

* Health endpoints are real ``http.server`` servers on loopback addresses (127.0.0.x, ::1),
  asked by the module's own urllib code from "the controller", or by a real ``curl`` in the
  script a check sends over SSH.
* SSH is a stub (``FAKE_SSH`` below, on PATH): it runs the command it is given under a real
  ``sh``, on a fake node that is a directory under tmp_path named by the host's address, with
  gpunode's service directory (gpunode.inference.SERVICES_DIR) moved into it and a
  ``systemctl`` stub that logs. So what a script *does* is checked (the ``current`` and
  ``previous`` links it reads and swaps, the units it restarts), not only its text. The stub
  is reached through the ``runner`` parameter (``Fleet`` below, which also answers the
  deploy), or through the module's default runner with PATH pointing at it.
* The deploy: ``Fleet`` answers a ``DeployRequest`` by switching the nodes' ``current`` links
  to a new model the way the deploy's switch does, and returning the exit status and output
  a test gives; ``_deploy`` is run once for real through pyinfra's ``@local`` connector and
  otherwise against a stand-in for ``gpunode.commands.run``.
* Waiting: ``wait_healthy`` sleeps between attempts; the tests that wait use ``clock``, which
  stands in for the ``time`` module of gpunode.commands.rollout only (a clock that only its
  ``sleep`` advances), so a check that keeps failing costs no real time and the number of
  attempts and the sleeps between them are exact.
"""

from __future__ import annotations

import http.server
import os
import shlex
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_inference import example, services

from gpunode.commands import rollout as rollout_module
from gpunode.commands import run
from gpunode.commands.rollout import (
    DeployRequest,
    Report,
    Step,
    _deploy,
    _host_failed,
    _last_error,
    _revert,
    _run,
    batches,
    check_health,
    current_links,
    health_url,
    rollout,
    ssh_command,
    wait_healthy,
)
from gpunode.config import load
from gpunode.inference import SERVICES_DIR
from gpunode.schema.node import Inventory

UNIT = "gpunode-inference-chat.service"
# model versions as the deploy's switch links them: <store>/sha256/<digest>
STORE = "/var/cache/gpunode/models/chat/sha256"
M0, M1, M2 = "0" * 64, "0123456789ab" + "1" * 52, "fedcba987654" + "2" * 52

FAKE_SSH = f"""#!/bin/sh
# ssh for these tests: runs the command (the last argument) under sh on the fake node of the
# address in USER@ADDRESS (the argument before it), with {SERVICES_DIR} moved into the node.
while [ $# -gt 2 ]; do shift; done
node="$FAKE_NODES/${{1#*@}}"
mkdir -p "$node"
command=$(printf '%s\\n' "$2" | sed "s#{SERVICES_DIR}#$node#g")
NODE="$node" exec sh -c "$command"
"""
FAKE_SYSTEMCTL = """#!/bin/sh
# systemctl for these tests: logs its arguments on the node; `restart` fails, printing the
# content of $NODE/restart-fails, when that file exists.
printf '%s\\n' "$*" >> "$NODE/systemctl.log"
if [ "$1" = restart ] && [ -f "$NODE/restart-fails" ]; then
    cat "$NODE/restart-fails" >&2
    exit 1
fi
"""
NO_SSH = """#!/bin/sh
echo "ssh: no real ssh in these tests" >&2
exit 255
"""


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture(autouse=True)
def _no_real_ssh(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The module's default runner runs ``ssh``: in these tests it finds a stub that fails
    (exit 255, as ssh does when it cannot connect) unless a test puts FAKE_SSH first."""
    stub = tmp_path_factory.getbasetemp() / "no-ssh-bin"
    if not (stub / "ssh").exists():
        _executable(stub / "ssh", NO_SSH)
    monkeypatch.setenv("PATH", f"{stub}:{os.environ['PATH']}")


# --- inventories ---------------------------------------------------------------------------


def inventory(
    listed: dict[str, dict[str, Any]] | None = None,
    hosts: dict[str, dict[str, Any]] | None = None,
) -> Inventory:
    """test_inference's example node with the services ``listed`` (name -> settings over its
    llama.cpp service ``chat``; a service not named chat gets its own served name), in that
    order, on ``hosts`` (name -> connection; default: one host ``a`` on 127.0.0.1)."""
    data = example()
    base = services(data)["chat"]
    data["inference"]["services"] = {
        name: {**base, "model": {**base["model"], "served_name": name}, **settings}
        for name, settings in (listed or {"chat": {}}).items()
    }
    hosts = hosts or {"a": {"address": "127.0.0.1"}}
    raw = {"defaults": data, "hosts": {n: {"connection": c} for n, c in hosts.items()}}
    return load(raw, source="inv.yml")


def fronted(port: int, port6: int, vision_port: int) -> Inventory:
    """Node ``a`` (127.0.0.1) whose chat (0.0.0.0) and chat6 (::) are fronted by the gateway
    host ``gw`` (127.0.0.9), so its firewall lets only the gateway reach them, and whose
    vision (Triton, 0.0.0.0) the gateway does not front (no OpenAI-compatible API)."""
    data = example()
    chat = {**services(data)["chat"], "port": port}
    del chat["api_key_secret"]  # the gateway checks the clients' keys
    chat6 = {**chat, "port": port6, "listen": "::"}
    chat6["model"] = {**chat["model"], "served_name": "chat6"}
    vision = {**services(data)["vision"], "port": vision_port}
    data["inference"]["services"] = {}
    gateway = {
        "enabled": True,
        "upstreams": ["a"],
        "clients": {"alice": {"key": {"path": "gpunode/clients/alice"}, "models": ["chat"]}},
    }
    raw = {
        "defaults": data,
        "groups": {
            "gateways": {"data": {"gateway": gateway}},
            "nodes": {
                "data": {
                    "inference": {"services": {"chat": chat, "chat6": chat6, "vision": vision}}
                }
            },
        },
        "hosts": {
            "a": {"connection": {"address": "127.0.0.1"}, "groups": ["nodes"]},
            "gw": {"connection": {"address": "127.0.0.9"}, "groups": ["gateways"]},
        },
    }
    return load(raw, source="inv.yml")


# --- real health endpoints on loopback -----------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Health

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        self.server.requests.append(self.path)
        status = self.server.answer(self.path)
        if status == 0:  # hang up without an answer
            self.close_connection = True
            return
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


class Health(http.server.ThreadingHTTPServer):
    """A real HTTP server on a loopback address, answering each GET with the status
    ``answer(path)`` returns (0: closes the connection without answering)."""

    daemon_threads = True

    def __init__(self, address: str, port: int = 0, answer: Callable[[str], int] | None = None):
        self.address_family = socket.AF_INET6 if ":" in address else socket.AF_INET
        super().__init__((address, port), _Handler)
        self.answer: Callable[[str], int] = answer or (lambda path: 200)
        self.requests: list[str] = []
        self.port = int(self.server_address[1])
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture
def servers() -> Iterator[Callable[..., Health]]:
    """Start Health servers (``servers(address, port, answer)``); all stopped at the end."""
    started: list[Health] = []

    def start(address: str = "127.0.0.1", port: int = 0, answer: Any = None) -> Health:
        started.append(Health(address, port, answer))
        return started[-1]

    yield start
    for server in started:
        server.close()


def health_answer(status: int) -> Callable[[str], int]:
    return lambda path: status if path == "/health" else 404


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Clock:
    """Stands in for the ``time`` module of gpunode.commands.rollout: ``monotonic`` reads a
    clock that only ``sleep`` advances (by exactly what it is asked); sleeps are recorded."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(rollout_module, "time", fake)
    return fake


# --- the fleet: fake nodes reached over the ssh stub, and the deploy ---------------------------


def _point(link: Path, target: str) -> None:
    """``ln -sfn target link``, atomically."""
    link.parent.mkdir(parents=True, exist_ok=True)
    new = link.with_name(f".{link.name}.new")
    if new.is_symlink():
        new.unlink()
    new.symlink_to(target)
    new.replace(link)


class Fleet:
    """Hosts a, b, c, d on 127.0.0.1 to 127.0.0.4, each with a disabled service ``off``
    (listed first; nothing answers on its port) and ``chat``, on a port common to all, where
    a real Health server answers 503 while the node's chat ``current`` link is on a model in
    ``bad[host]``, else 200. Every chat starts on M1 (previous: M0).

    Called as a runner: a DeployRequest switches each enabled service of the batch's hosts
    to ``deploy_to`` (previous -> the old current, current -> the new model) and answers
    ``answers[tuple(hosts)]`` (exit status, stdout, stderr; default: success, no output);
    an ssh argv must be exactly ``ssh_command(host, command)`` for a host of the inventory,
    and runs for real through FAKE_SSH. Every call is recorded in ``calls``."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "nodes"
        self.bin = tmp_path / "bin"
        _executable(self.bin / "ssh", FAKE_SSH)
        _executable(self.bin / "systemctl", FAKE_SYSTEMCTL)
        self.env = {
            **os.environ,
            "PATH": f"{self.bin}:{os.environ['PATH']}",
            "FAKE_NODES": str(self.root),
        }
        self.servers: list[Health] = []
        self.port = self._serve()
        self.inventory = self.make_inventory()
        self.calls: list[list[str]] = []
        self.deploy_to: str = M2
        self.answers: dict[tuple[str, ...], tuple[int, str, str]] = {}
        self.bad: dict[str, set[str]] = {}
        for name in self.inventory.hosts:
            self.link(name, "chat", M0, "previous")
            self.link(name, "chat", M1)

    def _serve(self) -> int:
        for _ in range(20):
            port = free_port()
            try:
                for i, name in enumerate("abcd", start=1):
                    self.servers.append(Health(f"127.0.0.{i}", port, self._answer(name)))
            except OSError:  # the port is taken on one of the addresses: another one
                self.close()
                continue
            return port
        raise RuntimeError("no port free on 127.0.0.1 to 127.0.0.4")

    def _answer(self, name: str) -> Callable[[str], int]:
        def answer(path: str) -> int:
            if path != "/health":
                return 404
            model = self.current(name, "chat").rsplit("/", 1)[-1]
            return 503 if model in self.bad.get(name, set()) else 200

        return answer

    def make_inventory(self, **chat: Any) -> Inventory:
        hosts = {name: {"address": f"127.0.0.{i}"} for i, name in enumerate("abcd", start=1)}
        listed = {
            # first: a check that stopped at the disabled service would never reach chat
            "off": {"port": self.port + 1, "enabled": False},
            "chat": {"port": self.port, "health_timeout": 5, **chat},
        }
        return inventory(listed, hosts)

    def close(self) -> None:
        for server in self.servers:
            server.close()
        self.servers = []

    def node(self, name: str) -> Path:
        return self.root / self.inventory.hosts[name].connection.address

    def link(self, host: str, service: str, model: str, which: str = "current") -> None:
        _point(self.node(host) / service / which, f"{STORE}/{model}")

    def current(self, host: str, service: str, which: str = "current") -> str:
        link = self.node(host) / service / which
        return os.readlink(link) if link.is_symlink() else ""

    def systemctl(self, host: str) -> list[str]:
        log = self.node(host) / "systemctl.log"
        return log.read_text().splitlines() if log.exists() else []

    def switch(self, hosts: list[str]) -> None:
        """What the deploy does to the links of each enabled service of these hosts."""
        for name in hosts:
            for svc_name, svc in self.inventory.hosts[name].config.inference.services.items():
                if svc.enabled:
                    old = self.current(name, svc_name)
                    if old:
                        _point(self.node(name) / svc_name / "previous", old)
                    self.link(name, svc_name, self.deploy_to)

    def deploys(self) -> list[list[str]]:
        return [c.hosts for c in self.calls if isinstance(c, DeployRequest)]

    def ssh_to(self) -> list[str]:
        """The hosts each ssh call went to, in order."""
        by_address = {h.connection.address: n for n, h in self.inventory.hosts.items()}
        return [by_address[c[-2].split("@")[1]] for c in self.calls if c[0] == "ssh"]

    def __call__(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(argv)
        if isinstance(argv, DeployRequest):
            self.switch(argv.hosts)
            return subprocess.CompletedProcess(
                argv, *self.answers.get(tuple(argv.hosts), (0, "", ""))
            )
        hosts = [
            h
            for h in self.inventory.hosts.values()
            if argv[-2].endswith(f"@{h.connection.address}")
        ]
        assert len(hosts) == 1 and argv == ssh_command(hosts[0], argv[-1]), argv
        return subprocess.run(
            argv, capture_output=True, text=True, env=self.env, stdin=subprocess.DEVNULL, timeout=60
        )


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    made = Fleet(tmp_path)
    yield made
    made.close()


def ok(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(argv, 0, "", "")


def sh(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """A runner that runs the command of an ssh argv here, under a real sh (the node is this
    machine: a health check's curl reaches the Health servers of the test)."""
    assert argv[0] == "ssh"
    return subprocess.run(
        ["sh", "-c", argv[-1]], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60
    )


# --- batches and the report ----------------------------------------------------------------


def test_batches_put_the_canary_hosts_alone_first_then_the_rest_batch_size_at_a_time() -> None:
    hosts = ["a", "b", "c", "d", "e"]
    assert batches(hosts) == [["a"], ["b"], ["c"], ["d"], ["e"]]  # defaults: 1 and 1
    assert batches(hosts, canary=1, batch_size=2) == [["a"], ["b", "c"], ["d", "e"]]
    assert batches(hosts, canary=2, batch_size=2) == [["a", "b"], ["c", "d"], ["e"]]
    assert batches(hosts, canary=0, batch_size=2) == [["a", "b"], ["c", "d"], ["e"]]
    assert batches(hosts, canary=0, batch_size=1) == [["a"], ["b"], ["c"], ["d"], ["e"]]
    assert batches(hosts, canary=1, batch_size=3) == [["a"], ["b", "c", "d"], ["e"]]
    assert batches(hosts, canary=4, batch_size=9) == [["a", "b", "c", "d"], ["e"]]
    assert batches(hosts, canary=7) == [hosts]  # more canaries than hosts: all of them
    assert batches([], canary=1) == []
    assert batches([], canary=0) == []


@pytest.mark.parametrize(("canary", "batch_size"), [(-1, 1), (1, 0), (0, -2), (-1, 0)])
def test_batches_refuse_a_negative_canary_or_an_empty_batch(canary: int, batch_size: int) -> None:
    with pytest.raises(ValueError) as err:
        batches(["a", "b"], canary=canary, batch_size=batch_size)
    assert str(err.value) == "canary must be >= 0 and batch_size >= 1"


def test_the_report_lists_each_host_and_the_hosts_not_touched() -> None:
    report = Report(
        steps=[Step("a", True, "canary: deployed and healthy"), Step("b", False, "batch 1: x")],
        untouched=["c", "d"],
    )
    assert not report.ok
    assert report.lines() == [
        "a: ok: canary: deployed and healthy",
        "b: FAILED: batch 1: x",
        "not touched (rollout stopped): c, d",
    ]
    done = Report(steps=[Step("a", True, "canary: deployed and healthy")])
    assert done.ok
    assert done.lines() == ["a: ok: canary: deployed and healthy"]
    assert Report().ok and Report().lines() == []


# --- ssh, the health URL -------------------------------------------------------------------


def test_ssh_argv_from_the_connection_settings() -> None:
    connection = {
        "address": "127.0.0.7",
        "port": 2200,
        "user": "admin",
        "key_file": "~/.ssh/gpunode_ed25519",
        "known_hosts_file": "/etc/gpunode/known_hosts",
        "strict_host_key_checking": "accept-new",
        "ssh_config_file": "/etc/gpunode/ssh_config",
    }
    host = inventory(hosts={"a": connection}).hosts["a"]
    command = "echo 'two words' && readlink /x"
    assert ssh_command(host, command) == [
        "ssh",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=15",
        "-p",
        "2200",
        "-F",
        "/etc/gpunode/ssh_config",
        "-i",
        "~/.ssh/gpunode_ed25519",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "UserKnownHostsFile=/etc/gpunode/known_hosts",
        "-o",
        "StrictHostKeyChecking=accept-new",
        "admin@127.0.0.7",
        command,  # one argument, as given: ssh hands it to the remote shell whole
    ]


def test_ssh_argv_of_a_host_with_the_default_connection_settings() -> None:
    host = inventory(hosts={"a": {"address": "::1"}}).hosts["a"]
    assert ssh_command(host, "true") == [
        "ssh",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=15",
        "-p",
        "22",
        "-o",
        "StrictHostKeyChecking=yes",
        "root@::1",
        "true",
    ]


@pytest.mark.parametrize(
    ("address", "listen", "runtime", "url"),
    [
        ("192.0.2.10", "0.0.0.0", "chat", "http://192.0.2.10:{port}/health"),  # noqa: S104
        ("192.0.2.10", "::", "chat", "http://192.0.2.10:{port}/health"),
        ("2001:db8::10", "0.0.0.0", "chat", "http://[2001:db8::10]:{port}/health"),  # noqa: S104
        ("gpu-01.example.com", "::", "chat", "http://gpu-01.example.com:{port}/health"),
        ("192.0.2.10", "10.0.0.5", "chat", "http://10.0.0.5:{port}/health"),
        ("192.0.2.10", "fd00::5", "chat", "http://[fd00::5]:{port}/health"),
        ("192.0.2.10", "0.0.0.0", "vision", "http://192.0.2.10:{port}/v2/health/ready"),  # noqa: S104
    ],
)
def test_the_health_url_is_where_a_client_reaches_the_service(
    address: str, listen: str, runtime: str, url: str
) -> None:
    """A wildcard listen is reached at the host's address, a specific one at itself; IPv6
    addresses in brackets; the path is the runtime's (Triton's for vision)."""
    data = example()
    svc = {**services(data)[runtime], "port": 8123, "listen": listen}
    data["inference"]["services"] = {"svc": svc}
    raw = {"defaults": data, "hosts": {"h": {"connection": {"address": address}}}}
    host = load(raw, source="inv.yml").hosts["h"]
    assert health_url(host, host.config.inference.services["svc"]) == url.format(port=8123)


# --- wait_healthy: asked from here -----------------------------------------------------------


def test_wait_healthy_returns_at_the_first_2xx(servers: Any, clock: Clock) -> None:
    for status in (200, 204, 299):
        server = servers(answer=health_answer(status))
        assert wait_healthy(f"http://127.0.0.1:{server.port}/health", 10) is None
        assert server.requests == ["/health"]
    assert clock.sleeps == []


def test_wait_healthy_asks_again_each_interval_until_it_answers(servers: Any, clock: Clock) -> None:
    answers = iter([503, 500, 200])
    server = servers(answer=lambda path: next(answers))
    assert wait_healthy(f"http://127.0.0.1:{server.port}/health", 10, interval=0.25) is None
    assert len(server.requests) == 3
    assert clock.sleeps == [0.25, 0.25]


def test_wait_healthy_gives_up_at_the_timeout_with_the_last_http_status(
    servers: Any, clock: Clock
) -> None:
    """Asked at 0, 1, 2 and 3 s (the default interval), the answer at 3 s is the last."""
    server = servers(answer=health_answer(503))
    url = f"http://127.0.0.1:{server.port}/health"
    assert wait_healthy(url, 3) == f"{url} not healthy after 3s (HTTP 503)"
    assert len(server.requests) == 4
    assert clock.sleeps == [1.0, 1.0, 1.0]
    server.requests.clear()
    clock.sleeps.clear()
    assert wait_healthy(url, 0) == f"{url} not healthy after 0s (HTTP 503)"  # asked once
    assert len(server.requests) == 1 and clock.sleeps == []
    missing = f"http://127.0.0.1:{server.port}/nope"
    assert wait_healthy(missing, 2.4) == f"{missing} not healthy after 2s (HTTP 404)"


def test_wait_healthy_says_why_nothing_answered(servers: Any, clock: Clock) -> None:
    refused = f"http://127.0.0.1:{free_port()}/health"  # nothing listens there
    assert wait_healthy(refused, 1) == (
        f"{refused} not healthy after 1s ([Errno 111] Connection refused)"
    )
    assert clock.sleeps == [1.0]
    server = servers(answer=lambda path: 0)  # hangs up without an answer
    url = f"http://127.0.0.1:{server.port}/health"
    assert wait_healthy(url, 0) == (
        f"{url} not healthy after 0s (Remote end closed connection without response)"
    )


def test_wait_healthy_gives_up_on_a_server_that_never_answers(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port that accepts connections and never answers: each attempt ends after 5 s."""
    asked: list[Any] = []
    urlopen = urllib.request.urlopen

    def spy(url: str, *args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs.get("timeout", args[1] if len(args) > 1 else None))
        return urlopen(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", spy)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/health"
        assert wait_healthy(url, 0) == f"{url} not healthy after 0s (timed out)"
    assert asked == [5]


# --- check_health: from here, or over ssh on the node ------------------------------------------


def health_script(url: str, seconds: int) -> str:
    """The check sent to a node: curl until a 2xx, each try up to 5 s, until the deadline."""
    return (
        f"deadline=$(($(date +%s) + {seconds})); "
        f"until curl -fsS -o /dev/null --max-time 5 {shlex.quote(url)}; do "
        '[ "$(date +%s)" -ge "$deadline" ] && exit 1; sleep 1; done'
    )


def test_a_service_on_every_address_is_asked_from_here(servers: Any, clock: Clock) -> None:
    server = servers("127.0.0.1", answer=health_answer(200))
    host = inventory({"chat": {"port": server.port}}).hosts["a"]
    calls: list[list[str]] = []

    def runner(argv: list[str]) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        return ok(argv)

    assert check_health(host, host.config.inference.services["chat"], 5, runner) is None
    assert server.requests == ["/health"] and calls == []
    url = f"http://127.0.0.1:{server.port}/health"
    server.answer = health_answer(503)
    err = check_health(host, host.config.inference.services["chat"], 4, runner)
    assert err == f"{url} not healthy after 4s (HTTP 503)"
    assert clock.sleeps == [1.0] * 4 and calls == []


@pytest.mark.parametrize(
    ("listen", "asked"),
    [("127.0.0.1", "127.0.0.1"), ("127.0.0.5", "127.0.0.5"), ("::1", "[::1]")],
)
def test_a_service_on_loopback_is_asked_on_its_node_over_ssh(
    servers: Any, listen: str, asked: str
) -> None:
    server = servers(listen.strip("[]"), answer=health_answer(200))
    host = inventory(
        {"chat": {"port": server.port, "listen": listen}},
        hosts={"a": {"address": "192.0.2.10", "port": 2222}},
    ).hosts["a"]
    calls: list[list[str]] = []

    def runner(argv: list[str]) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        return sh(argv)

    assert check_health(host, host.config.inference.services["chat"], 7, runner) is None
    assert calls == [ssh_command(host, health_script(f"http://{asked}:{server.port}/health", 7))]
    assert server.requests == ["/health"]  # the script's curl asked the real server


def test_a_loopback_check_that_fails_on_the_node_names_the_url_host_and_timeout() -> None:
    """Nothing answers: the script gives up at its deadline (1 s here), with exit status 1."""
    port = free_port()
    host = inventory({"chat": {"port": port, "listen": "127.0.0.1"}}).hosts["a"]
    svc = host.config.inference.services["chat"]
    results: list[subprocess.CompletedProcess[str]] = []

    def runner(argv: list[str]) -> subprocess.CompletedProcess[str]:
        results.append(sh(argv))
        return results[-1]

    err = check_health(host, svc, 1.4, runner)
    assert err == f"http://127.0.0.1:{port}/health on a not healthy after 1s"
    assert [r.returncode for r in results] == [1]
    assert "curl" in results[0].stderr  # curl said why, on each try

    def exit_status(status: int) -> Callable[[list[str]], subprocess.CompletedProcess[str]]:
        return lambda argv: subprocess.CompletedProcess(argv, status, "", "")

    assert check_health(host, svc, 9, exit_status(255)) == (
        f"http://127.0.0.1:{port}/health on a not healthy after 9s"  # ssh failed: the same
    )
    assert check_health(host, svc, 9, exit_status(0)) is None


def test_a_service_fronted_by_gateways_on_other_hosts_is_asked_on_its_node(servers: Any) -> None:
    """Its firewall lets only the gateways in, so it is asked over ssh on its node, on the
    loopback address of its wildcard listen's family; the same node's service that no
    gateway fronts is asked from here."""
    v4 = servers("127.0.0.1", answer=health_answer(200))
    v6 = servers("::1", answer=health_answer(200))
    triton = servers("127.0.0.1", answer=lambda path: 200 if path == "/v2/health/ready" else 404)
    host = fronted(v4.port, v6.port, triton.port).hosts["a"]
    assert set(host.config.gateway_sources) == {"chat", "chat6"}
    calls: list[list[str]] = []

    def runner(argv: list[str]) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        return sh(argv)

    svcs = host.config.inference.services
    assert check_health(host, svcs["chat"], 3, runner) is None
    assert check_health(host, svcs["chat6"], 3, runner) is None
    assert calls == [
        ssh_command(host, health_script(f"http://127.0.0.1:{v4.port}/health", 3)),
        ssh_command(host, health_script(f"http://[::1]:{v6.port}/health", 3)),
    ]
    assert v4.requests == ["/health"] and v6.requests == ["/health"]
    calls.clear()
    assert check_health(host, svcs["vision"], 3, runner) is None
    assert calls == [] and triton.requests == ["/v2/health/ready"]


# --- the deploy: DeployRequest, _run, _deploy ---------------------------------------------------


def test_a_deploy_request_is_the_argv_of_the_equivalent_pyinfra_command() -> None:
    hosts = ["a", "b"]
    request = DeployRequest("inventories/prod.py", "deploys/gpu_node.py", hosts)
    assert request == [
        sys.executable,
        "-m",
        "pyinfra",
        "-y",
        "inventories/prod.py",
        "deploys/gpu_node.py",
        "--limit",
        "a",
        "--limit",
        "b",
    ]
    assert (request.inventory_file, request.deploy, request.hosts) == (
        "inventories/prod.py",
        "deploys/gpu_node.py",
        ["a", "b"],
    )
    hosts.append("c")  # the request keeps its own list
    assert request.hosts == ["a", "b"]


def test_run_runs_a_command_with_its_output_captured_as_text() -> None:
    proc = _run(["sh", "-c", "printf 'out\\n'; printf err >&2; exit 3"])
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\n", "err")


def test_run_gives_a_command_no_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """ssh would read the controller's stdin: the command gets /dev/null. Here this
    process's own stdin is a pipe holding data, which a command that inherited it would
    read; and every command is bounded by an hour."""
    bounded: list[Any] = []
    real = subprocess.run

    def spy(*args: Any, **kwargs: Any) -> Any:
        bounded.append(kwargs.get("timeout"))
        return real(*args, **kwargs)

    monkeypatch.setattr(subprocess, "run", spy)
    read, write = os.pipe()
    os.write(write, b"the controller's own input\n")
    os.close(write)
    saved = os.dup(0)
    try:
        os.dup2(read, 0)
        proc = _run(["sh", "-c", "cat; echo done"])
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(read)
    assert (proc.returncode, proc.stdout) == (0, "done\n")
    assert bounded == [3600]


def test_run_runs_a_deploy_request_in_this_process(tmp_path: Path) -> None:
    """Not as a pyinfra subprocess: through _deploy (here, its inventory does not exist)."""
    missing = tmp_path / "missing.py"
    request = DeployRequest(str(missing), "deploys/gpu_node.py", ["a"])
    proc = _run(request)
    assert proc.args is request
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == f"pyinfra error: {missing}: no such inventory file\n"


def test_deploy_runs_pyinfra_for_real_and_reports_like_its_cli(tmp_path: Path) -> None:
    """pyinfra's @local connector runs the deploy's commands here: an operation that fails
    after printing gpunode's own message, which the result carries, prefixed with the host
    (other output is not carried)."""
    inventory_file = tmp_path / "inventory.py"
    inventory_file.write_text('nodes = [("@local", {})]\n')
    deploy = tmp_path / "deploy.py"
    deploy.write_text(
        "from pyinfra.operations import server\n"
        'server.shell(name="fine", commands=["true"])\n'
        'server.shell(name="check", commands=['
        "\"echo noise >&2; echo '  gpunode: model sha256 mismatch ' >&2; exit 3\"])\n"
    )
    request = DeployRequest(str(inventory_file), str(deploy), ["@local"])
    proc = _deploy(request)
    assert proc.args is request and proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines[0] == "[@local] gpunode: model sha256 mismatch"
    assert lines[1].startswith("[@local] Error: ") and "check" in lines[1]
    assert len(lines) == 2 and proc.stderr.endswith("\n")
    deploy.write_text('from pyinfra.operations import server\nserver.shell(commands=["true"])\n')
    done = _deploy(request)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


@pytest.fixture
def fake_run(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """gpunode.commands.run's load_inventory and run, replaced: they record how they were
    called and return ``state["results"]`` (or raise ``state["raise"]``)."""
    state: dict[str, Any] = {"calls": [], "results": {}, "raise": None}
    loaded = object()

    def load_inventory(path: Any, limit: Any = None) -> Any:
        state["calls"].append(("load_inventory", path, None if limit is None else list(limit)))
        return loaded

    def fake(inventory: Any, deploy: Any, **kwargs: Any) -> Any:
        state["calls"].append(("run", inventory is loaded, deploy, kwargs))
        if state["raise"]:
            raise state["raise"]
        return state["results"]

    monkeypatch.setattr(run, "load_inventory", load_inventory)
    monkeypatch.setattr(run, "run", fake)
    return state


def test_deploy_reports_each_failed_host_with_gpunode_s_own_lines(fake_run: dict[str, Any]) -> None:
    fake_run["results"] = {
        "a": run.HostRun("a", output=["gpunode: not an error: a host that did not fail"]),
        "b": run.HostRun(
            "b",
            error="operation failed: gpunode inference | Model",
            output=["noise", "  gpunode: model sha256 mismatch  ", "gpunode: expected aaaa"],
        ),
        "c": run.HostRun("c", error="could not connect"),
    }
    request = DeployRequest("inv.py", "deploys/x.py", ["a", "b", "c"])
    proc = _deploy(request)
    assert fake_run["calls"] == [
        ("load_inventory", "inv.py", ["a", "b", "c"]),
        ("run", True, "deploys/x.py", {"apply": True}),
    ]
    assert proc.args is request
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == (
        "[b] gpunode: model sha256 mismatch\n"
        "[b] gpunode: expected aaaa\n"
        "[b] Error: operation failed: gpunode inference | Model\n"
        "[c] Error: could not connect\n"
    )


def test_deploy_succeeds_when_no_host_failed(fake_run: dict[str, Any]) -> None:
    fake_run["results"] = {"a": run.HostRun("a"), "b": run.HostRun("b", output=["gpunode: x"])}
    proc = _deploy(DeployRequest("inv.py", "deploys/x.py", ["a", "b"]))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_deploy_that_fails_as_a_whole_is_a_pyinfra_error(fake_run: dict[str, Any]) -> None:
    fake_run["raise"] = run.RunError("inv.py: cannot load the inventory: boom")
    request = DeployRequest("inv.py", "deploys/x.py", ["a"])
    proc = _deploy(request)
    assert proc.args is request
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == "pyinfra error: inv.py: cannot load the inventory: boom\n"


# --- which host failed, and why ---------------------------------------------------------------


def done(status: int, stderr: str = "", stdout: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(["deploy"], status, stdout, stderr)


def test_an_error_that_names_a_host_fails_that_host_only() -> None:
    batch = ["gpu-1", "gpu-10", "gpu-2"]
    proc = done(1, "[gpu-10] some output\n[gpu-10] Error: operation failed\n")
    assert [_host_failed(proc, h, batch) for h in batch] == [False, True, False]
    in_stdout = done(1, stdout="[gpu-2] Error: could not connect\n")
    assert [_host_failed(in_stdout, h, batch) for h in batch] == [False, False, True]
    both = done(1, "[gpu-1] error: x\n", stdout="[gpu-2] Error: y\n")
    assert [_host_failed(both, h, batch) for h in batch] == [True, False, True]


def test_an_error_that_names_no_host_of_the_batch_fails_them_all() -> None:
    batch = ["a", "b"]
    for proc in (
        done(1, "pyinfra error: cannot load the inventory\n"),
        done(1, "[a] output without the word\n[b] more output\nError: no hosts remain\n"),
        done(1, "[z] Error: a host of another batch\n"),
        done(1),
    ):
        assert [_host_failed(proc, h, batch) for h in batch] == [True, True], proc


def test_the_last_error_prefers_gpunode_s_own_words_about_the_host() -> None:
    proc = done(
        1,
        "[b] gpunode: model sha256 mismatch\n"
        "  [b] gpunode: first line  \n"
        "[b] gpunode: expected aaaa\n"
        "[b] Error: operation failed\n"
        "[a] gpunode: about another host\n",
    )
    assert _last_error(proc, "b") == "[b] gpunode: expected aaaa"
    assert _last_error(proc, "a") == "[a] gpunode: about another host"


def test_the_last_error_else_is_the_host_s_last_error_line() -> None:
    proc = done(
        1,
        "[b] Error: first\n[b] error: second\n[b] Error: third\n[b] output\n[a] Error: a's\n",
        stdout="noise\n",
    )
    assert _last_error(proc, "b") == "[b] Error: third"
    in_stdout = done(1, "[a] Error: a's\n", stdout="[b] Error: in stdout\n")
    assert _last_error(in_stdout, "b") == "[b] Error: in stdout"


def test_the_last_error_else_is_the_last_line_else_the_exit_status() -> None:
    proc = done(1, "  first  \n\npyinfra error: cannot connect\n  \n", stdout="before\n")
    assert _last_error(proc, "b") == "pyinfra error: cannot connect"
    assert _last_error(done(1, stdout="one\ntwo\nthree\n"), "b") == "three"
    assert _last_error(done(2, " \n\n"), "b") == "exit status 2"


def test_the_last_error_is_cut_at_300_characters() -> None:
    long = "[b] gpunode: " + "x" * 400
    assert _last_error(done(1, f"{long}\n"), "b") == long[:300]
    assert len(long[:300]) == 300


# --- the model links ------------------------------------------------------------------------


def test_current_links_reads_where_each_service_s_current_link_points(fleet: Fleet) -> None:
    """Read over ssh on the node: a link, a link whose target has an '=', no link."""
    fleet.inventory = inventory(
        {"chat": {"port": 8080}, "embed": {"port": 8081}, "rerank": {"port": 8082}},
        {"a": {"address": "127.0.0.1"}},
    )
    _point(fleet.node("a") / "embed" / "current", "../store/sha256=odd/" + M2)
    assert current_links(fleet.inventory.hosts["a"], fleet) == {
        "chat": f"{STORE}/{M1}",
        "embed": f"../store/sha256=odd/{M2}",
        "rerank": "",
    }
    assert fleet.ssh_to() == ["a"]


def test_current_links_of_a_host_without_services_asks_nothing() -> None:
    data = example()
    del data["inference"]
    host = load({"defaults": data, "hosts": {"a": {"connection": {"address": "127.0.0.1"}}}}, "i")
    calls: list[list[str]] = []
    assert current_links(host.hosts["a"], lambda argv: calls.append(argv) or ok(argv)) == {}
    assert calls == []


def test_current_links_when_ssh_fails_or_answers_in_part() -> None:
    host = inventory({"chat": {"port": 8080}, "embed": {"port": 8081}}).hosts["a"]

    def answer(status: int, stdout: str) -> Callable[[list[str]], subprocess.CompletedProcess[str]]:
        return lambda argv: subprocess.CompletedProcess(argv, status, stdout, "")

    assert current_links(host, answer(255, "chat=/m/x\n")) == {"chat": "", "embed": ""}
    assert current_links(host, answer(1, "")) == {"chat": "", "embed": ""}
    # a banner line without '=', and no line for embed: no link known for it
    assert current_links(host, answer(0, "Welcome to a\nchat=/m/x\n")) == {
        "chat": "/m/x",
        "embed": "",
    }


def test_current_links_through_the_default_runner_runs_ssh(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = fleet.inventory.hosts["b"]
    assert current_links(host) == {"off": "", "chat": ""}  # the failing ssh stub: exit 255
    monkeypatch.setenv("PATH", fleet.env["PATH"])
    monkeypatch.setenv("FAKE_NODES", fleet.env["FAKE_NODES"])
    assert current_links(host) == {"off": "", "chat": f"{STORE}/{M1}"}


# --- the revert ------------------------------------------------------------------------------


def test_revert_puts_back_a_switched_service_and_checks_it_again(
    fleet: Fleet, clock: Clock
) -> None:
    host = fleet.inventory.hosts["c"]
    before = current_links(host, fleet)
    fleet(DeployRequest("inv.py", "deploys/gpu_node.py", ["c"]))  # chat: M1 -> M2
    fleet.calls.clear()
    assert _revert(host, before, fleet, 3) == f"chat: reverted to model {M1[:12]}, healthy"
    assert (fleet.current("c", "chat"), fleet.current("c", "chat", "previous")) == (
        f"{STORE}/{M1}",
        f"{STORE}/{M2}",
    )
    assert fleet.systemctl("c") == [f"reset-failed {UNIT}", f"restart {UNIT}"]
    assert fleet.ssh_to() == ["c", "c"]  # the links read, the revert
    assert fleet.servers[2].requests == ["/health"]  # checked again, from here
    assert fleet.systemctl("b") == [] and fleet.current("b", "chat") == f"{STORE}/{M1}"


def test_revert_says_so_when_the_old_model_is_not_healthy_either(
    fleet: Fleet, clock: Clock
) -> None:
    host = fleet.inventory.hosts["a"]
    before = current_links(host, fleet)
    fleet(DeployRequest("inv.py", "deploys/gpu_node.py", ["a"]))
    fleet.bad["a"] = {M1, M2}
    url = f"http://127.0.0.1:{fleet.port}/health"
    assert _revert(host, before, fleet, 2) == (
        f"chat: reverted to model {M1[:12]}, not healthy: {url} not healthy after 2s (HTTP 503)"
    )
    assert fleet.current("a", "chat") == f"{STORE}/{M1}"
    # no timeout given: the service's own health_timeout (5 s)
    fleet(DeployRequest("inv.py", "deploys/gpu_node.py", ["a"]))
    assert _revert(host, before, fleet, None) == (
        f"chat: reverted to model {M1[:12]}, not healthy: {url} not healthy after 5s (HTTP 503)"
    )


def test_revert_with_nothing_switched_touches_nothing(fleet: Fleet) -> None:
    host = fleet.inventory.hosts["a"]
    nothing = "nothing to revert (no model link was switched)"
    assert _revert(host, current_links(host, fleet), fleet, 3) == nothing
    (fleet.node("a") / "chat" / "current").unlink()  # a link gone is not a switch
    assert _revert(host, {"chat": f"{STORE}/{M1}", "off": ""}, fleet, 3) == nothing
    assert fleet.systemctl("a") == [] and fleet.current("a", "chat", "previous") == f"{STORE}/{M0}"
    assert fleet.ssh_to() == ["a", "a", "a"]  # links read three times, nothing else


def test_revert_of_a_service_with_no_previous_version_fails_and_says_why(fleet: Fleet) -> None:
    (fleet.node("a") / "chat" / "previous").unlink()
    host = fleet.inventory.hosts["a"]
    assert _revert(host, {}, fleet, 3) == (
        "chat: revert FAILED (gpunode: no previous version to return to)"
    )
    assert fleet.current("a", "chat") == f"{STORE}/{M1}" and fleet.systemctl("a") == []


def test_revert_whose_restart_fails_carries_the_end_of_its_error(fleet: Fleet) -> None:
    message = "Job for gpunode-inference-chat.service failed: " + "x" * 250 + "END"
    (fleet.node("a") / "restart-fails").write_text(f"  {message}  \n\n")
    host = fleet.inventory.hosts["a"]
    before = current_links(host, fleet)
    fleet(DeployRequest("inv.py", "deploys/gpu_node.py", ["a"]))
    assert _revert(host, before, fleet, 3) == f"chat: revert FAILED ({message[-200:]})"
    assert message[-200:].endswith("xEND") and len(message) > 200
    assert fleet.systemctl("a") == [f"reset-failed {UNIT}", f"restart {UNIT}"]


def test_revert_goes_through_every_switched_service(servers: Any, tmp_path: Path) -> None:
    """Services on loopback (checked on the node, over ssh): chat is new (no link before the
    deploy, so no previous version: its revert fails), embed and rerank were switched (rerank's
    links are relative), keep was not."""
    health = {name: servers(answer=health_answer(200)) for name in ("embed", "rerank")}
    loopback = {"listen": "127.0.0.1", "health_timeout": 5}
    listed = {
        "chat": {"port": free_port(), **loopback},
        "embed": {"port": health["embed"].port, **loopback},
        "keep": {"port": free_port(), **loopback},
        "rerank": {"port": health["rerank"].port, **loopback, "health_timeout": 9},
    }
    fleet = Fleet(tmp_path)
    try:
        fleet.inventory = inventory(listed, {"a": {"address": "127.0.0.1"}})
        (fleet.node("a") / "chat" / "current").unlink()
        (fleet.node("a") / "chat" / "previous").unlink()
        for name in ("embed", "keep"):
            fleet.link("a", name, M0, "previous")
            fleet.link("a", name, M1)
        _point(fleet.node("a") / "rerank" / "previous", M0)
        _point(fleet.node("a") / "rerank" / "current", M1)
        host = fleet.inventory.hosts["a"]
        before = current_links(host, fleet)
        assert before == {
            "chat": "",
            "embed": f"{STORE}/{M1}",
            "keep": f"{STORE}/{M1}",
            "rerank": M1,
        }
        fleet(DeployRequest("inv.py", "deploys/gpu_node.py", ["a"]))
        fleet.link("a", "keep", M1)  # the deploy left keep on its model
        fleet.calls.clear()
        assert _revert(host, before, fleet, None) == (
            "chat: revert FAILED (gpunode: no previous version to return to); "
            f"embed: reverted to model {M1[:12]}, healthy; "
            f"rerank: reverted to model {M1[:12]}, healthy"
        )
    finally:
        fleet.close()
    assert fleet.current("a", "chat") == f"{STORE}/{M2}"
    assert fleet.current("a", "embed") == f"{STORE}/{M1}"
    assert fleet.current("a", "rerank") == M1
    assert fleet.current("a", "keep") == f"{STORE}/{M1}"
    assert fleet.systemctl("a") == [
        "reset-failed gpunode-inference-embed.service",
        "restart gpunode-inference-embed.service",
        "reset-failed gpunode-inference-rerank.service",
        "restart gpunode-inference-rerank.service",
    ]
    checks = [c[-1] for c in fleet.calls if "curl" in c[-1]]
    assert checks == [  # no timeout given: each service's own health_timeout
        health_script(f"http://127.0.0.1:{health['embed'].port}/health", 5),
        health_script(f"http://127.0.0.1:{health['rerank'].port}/health", 9),
    ]
    assert health["embed"].requests == ["/health"] and health["rerank"].requests == ["/health"]


# --- the rollout ------------------------------------------------------------------------------


def url_of(fleet: Fleet, host: str) -> str:
    return f"http://{fleet.inventory.hosts[host].connection.address}:{fleet.port}/health"


def test_a_rollout_deploys_the_canary_then_each_batch_and_checks_each_host(
    fleet: Fleet, clock: Clock
) -> None:
    """Every node answers 503 on the old model: each is checked after its batch's deploy.
    The links of a batch's hosts are read (over ssh) before its deploy."""
    fleet.bad = {h: {M1} for h in "abcd"}
    said: list[str] = []
    report = rollout(
        "inventories/prod.py",
        fleet.inventory,
        deploy="deploys/other.py",
        canary=1,
        batch_size=2,
        timeout=3,
        runner=fleet,
        say=said.append,
    )
    assert said == ["rollout: canary: a", "rollout: batch 1: b, c", "rollout: batch 2: d"]
    requests = [c for c in fleet.calls if isinstance(c, DeployRequest)]
    assert [(r.inventory_file, r.deploy, r.hosts) for r in requests] == [
        ("inventories/prod.py", "deploys/other.py", ["a"]),
        ("inventories/prod.py", "deploys/other.py", ["b", "c"]),
        ("inventories/prod.py", "deploys/other.py", ["d"]),
    ]
    order = [c.hosts if isinstance(c, DeployRequest) else c[-2] for c in fleet.calls]
    assert order == [
        "root@127.0.0.1", ["a"], "root@127.0.0.2", "root@127.0.0.3", ["b", "c"],
        "root@127.0.0.4", ["d"],
    ]  # fmt: skip
    assert report.ok and report.untouched == []
    assert report.lines() == [
        "a: ok: canary: deployed and healthy",
        "b: ok: batch 1: deployed and healthy",
        "c: ok: batch 1: deployed and healthy",
        "d: ok: batch 2: deployed and healthy",
    ]
    assert [len(s.requests) for s in fleet.servers] == [1, 1, 1, 1]  # the disabled off: never
    assert {fleet.current(h, "chat") for h in "abcd"} == {f"{STORE}/{M2}"}
    assert clock.sleeps == []


def test_a_rollout_by_default_goes_one_host_at_a_time_and_does_not_revert(
    fleet: Fleet, clock: Clock, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet.bad["c"] = {M2}
    report = rollout("inv.py", fleet.inventory, timeout=3, runner=fleet)
    assert capsys.readouterr().out == (
        "rollout: canary: a\nrollout: batch 1: b\nrollout: batch 2: c\n"
    )
    requests = [c for c in fleet.calls if isinstance(c, DeployRequest)]
    assert [(r.deploy, r.hosts) for r in requests] == [
        ("deploys/gpu_node.py", ["a"]),
        ("deploys/gpu_node.py", ["b"]),
        ("deploys/gpu_node.py", ["c"]),
    ]
    assert not report.ok and [s.ok for s in report.steps] == [True, True, False]
    assert report.lines() == [
        "a: ok: canary: deployed and healthy",
        "b: ok: batch 1: deployed and healthy",
        f"c: FAILED: batch 2: chat: {url_of(fleet, 'c')} not healthy after 3s (HTTP 503)",
        "not touched (rollout stopped): d",
    ]
    assert fleet.current("c", "chat") == f"{STORE}/{M2}" and fleet.systemctl("c") == []
    assert fleet.current("d", "chat") == f"{STORE}/{M1}"


def test_without_a_canary_the_batches_are_numbered_from_zero(fleet: Fleet) -> None:
    said: list[str] = []
    report = rollout(
        "inv.py", fleet.inventory, canary=0, batch_size=3, timeout=3, runner=fleet, say=said.append
    )
    assert said == ["rollout: batch 0: a, b, c", "rollout: batch 1: d"]
    assert report.ok
    assert [line.split(": ", 2)[2] for line in report.lines()] == [
        "batch 0: deployed and healthy",
        "batch 0: deployed and healthy",
        "batch 0: deployed and healthy",
        "batch 1: deployed and healthy",
    ]


def test_a_rollout_of_some_hosts_touches_only_those_in_the_order_given(fleet: Fleet) -> None:
    said: list[str] = []
    report = rollout(
        "inv.py", fleet.inventory, hosts=["d", "b"], timeout=3, runner=fleet, say=said.append
    )
    assert said == ["rollout: canary: d", "rollout: batch 1: b"]
    assert fleet.deploys() == [["d"], ["b"]]
    assert report.ok and [s.host for s in report.steps] == ["d", "b"]
    assert fleet.current("a", "chat") == fleet.current("c", "chat") == f"{STORE}/{M1}"
    assert fleet.current("b", "chat") == fleet.current("d", "chat") == f"{STORE}/{M2}"
    assert sorted(set(fleet.ssh_to())) == ["b", "d"]


def test_each_service_waits_its_own_health_timeout_unless_one_is_given(
    fleet: Fleet, clock: Clock
) -> None:
    fleet.inventory = fleet.make_inventory(health_timeout=7)
    fleet.bad["a"] = {M2}
    report = rollout("inv.py", fleet.inventory, hosts=["a"], runner=fleet, say=lambda _: None)
    url = url_of(fleet, "a")
    assert report.lines() == [f"a: FAILED: canary: chat: {url} not healthy after 7s (HTTP 503)"]
    assert clock.sleeps == [1.0] * 7
    clock.sleeps.clear()
    report = rollout(
        "inv.py", fleet.inventory, hosts=["a"], timeout=2, runner=fleet, say=lambda _: None
    )
    assert report.lines() == [f"a: FAILED: canary: chat: {url} not healthy after 2s (HTTP 503)"]
    assert clock.sleeps == [1.0, 1.0]


def test_a_rollout_checks_a_service_on_loopback_on_its_node_through_the_runner(
    fleet: Fleet,
) -> None:
    """chat on 127.0.0.1: the check is the curl script sent over ssh (the stub runs it here,
    where host a's Health server listens on that address)."""
    fleet.inventory = fleet.make_inventory(listen="127.0.0.1")
    report = rollout("inv.py", fleet.inventory, hosts=["a"], runner=fleet, say=lambda _: None)
    assert report.lines() == ["a: ok: canary: deployed and healthy"]
    checks = [c for c in fleet.calls if not isinstance(c, DeployRequest) and "curl" in c[-1]]
    assert checks == [ssh_command(fleet.inventory.hosts["a"], health_script(url_of(fleet, "a"), 5))]
    assert fleet.servers[0].requests == ["/health"]


def test_a_failed_deploy_fails_the_host_it_names_and_stops_the_rollout(fleet: Fleet) -> None:
    fleet.answers[("b", "c")] = (
        1,
        "[b] Changed: 3 operations\n",
        "[c] gpunode: model sha256 mismatch\n[c] Error: operation failed: gpunode model\n",
    )
    report = rollout(
        "inv.py", fleet.inventory, batch_size=2, timeout=3, runner=fleet, say=lambda _: None
    )
    assert fleet.deploys() == [["a"], ["b", "c"]]
    assert report.lines() == [
        "a: ok: canary: deployed and healthy",
        "b: ok: batch 1: deployed and healthy",
        "c: FAILED: batch 1: deploy failed: [c] gpunode: model sha256 mismatch",
        "not touched (rollout stopped): d",
    ]
    assert report.untouched == ["d"] and fleet.current("d", "chat") == f"{STORE}/{M1}"


def test_a_failed_deploy_that_names_no_host_fails_the_whole_batch(fleet: Fleet) -> None:
    fleet.answers[("b", "c")] = (1, "", "pyinfra error: cannot load the inventory\n")
    report = rollout(
        "inv.py", fleet.inventory, batch_size=2, timeout=3, runner=fleet, say=lambda _: None
    )
    assert report.lines()[1:] == [
        "b: FAILED: batch 1: deploy failed: pyinfra error: cannot load the inventory",
        "c: FAILED: batch 1: deploy failed: pyinfra error: cannot load the inventory",
        "not touched (rollout stopped): d",
    ]


def test_error_words_in_a_successful_deploy_fail_nothing(fleet: Fleet) -> None:
    fleet.answers[("b", "c")] = (0, "[b] Error: a warning pyinfra printed\n", "[c] error: x\n")
    report = rollout(
        "inv.py", fleet.inventory, batch_size=2, timeout=3, runner=fleet, say=lambda _: None
    )
    assert report.ok and len(report.steps) == 4


def test_a_host_that_failed_its_deploy_and_its_check_is_reported_with_both(
    fleet: Fleet, clock: Clock
) -> None:
    fleet.answers[("a",)] = (1, "", "[a] Error: operation failed: x\n")
    fleet.bad["a"] = {M2}
    report = rollout("inv.py", fleet.inventory, timeout=3, runner=fleet, say=lambda _: None)
    assert report.lines() == [
        "a: FAILED: canary: deploy failed: [a] Error: operation failed: x; "
        f"chat: {url_of(fleet, 'a')} not healthy after 3s (HTTP 503)",
        "not touched (rollout stopped): b, c, d",
    ]
    assert fleet.deploys() == [["a"]]


def test_a_failure_in_the_last_batch_leaves_no_host_untouched(fleet: Fleet, clock: Clock) -> None:
    fleet.bad["d"] = {M2}
    report = rollout(
        "inv.py", fleet.inventory, batch_size=2, timeout=3, runner=fleet, say=lambda _: None
    )
    assert not report.ok and report.untouched == []
    assert report.lines()[-1].startswith("d: FAILED: batch 2: chat: ")


def test_revert_puts_back_only_the_failed_hosts_of_the_batch(fleet: Fleet, clock: Clock) -> None:
    """b's new model is unhealthy and so is its old one; c's new one only; d is fine."""
    fleet.bad = {"b": {M1, M2}, "c": {M2}}
    report = rollout(
        "inv.py",
        fleet.inventory,
        canary=1,
        batch_size=3,
        timeout=3,
        revert=True,
        runner=fleet,
        say=lambda _: None,
    )
    b, c = url_of(fleet, "b"), url_of(fleet, "c")
    assert report.lines() == [
        "a: ok: canary: deployed and healthy",
        f"b: FAILED: batch 1: chat: {b} not healthy after 3s (HTTP 503); chat: reverted to "
        f"model {M1[:12]}, not healthy: {b} not healthy after 3s (HTTP 503)",
        f"c: FAILED: batch 1: chat: {c} not healthy after 3s (HTTP 503); chat: reverted to "
        f"model {M1[:12]}, healthy",
        "d: ok: batch 1: deployed and healthy",
    ]
    assert {h: fleet.current(h, "chat") for h in "abcd"} == {
        "a": f"{STORE}/{M2}",
        "b": f"{STORE}/{M1}",
        "c": f"{STORE}/{M1}",
        "d": f"{STORE}/{M2}",
    }
    assert [fleet.systemctl(h) for h in "abcd"] == [
        [],
        [f"reset-failed {UNIT}", f"restart {UNIT}"],
        [f"reset-failed {UNIT}", f"restart {UNIT}"],
        [],
    ]


def test_a_rollout_with_the_default_runner_runs_ssh_and_the_deploy_in_this_process(
    fleet: Fleet, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No runner given: ssh is the stub on PATH, the deploy goes through _deploy to
    gpunode.commands.run (replaced: it switches the links and fails host b)."""
    monkeypatch.setenv("PATH", fleet.env["PATH"])
    monkeypatch.setenv("FAKE_NODES", fleet.env["FAKE_NODES"])
    limits: list[list[str]] = []

    def load_inventory(path: str, limit: list[str]) -> list[str]:
        assert path == "inv.py"
        limits.append(list(limit))
        return list(limit)

    def fake_run(hosts: list[str], deploy: str, apply: bool) -> dict[str, run.HostRun]:
        assert (deploy, apply) == ("deploys/gpu_node.py", True)
        fleet.switch(hosts)
        failed = {"error": "operation failed: x", "output": ["gpunode: model check failed"]}
        return {h: run.HostRun(h, **(failed if h == "b" else {})) for h in hosts}  # type: ignore[arg-type]

    monkeypatch.setattr(run, "load_inventory", load_inventory)
    monkeypatch.setattr(run, "run", fake_run)
    fleet.bad["b"] = {M2}
    report = rollout("inv.py", fleet.inventory, timeout=3, revert=True, say=lambda _: None)
    assert limits == [["a"], ["b"]]
    assert report.lines() == [
        "a: ok: canary: deployed and healthy",
        "b: FAILED: batch 1: deploy failed: [b] gpunode: model check failed; "
        f"chat: {url_of(fleet, 'b')} not healthy after 3s (HTTP 503); "
        f"chat: reverted to model {M1[:12]}, healthy",
        "not touched (rollout stopped): c, d",
    ]
    assert fleet.current("b", "chat") == f"{STORE}/{M1}"
    assert fleet.systemctl("b") == [f"reset-failed {UNIT}", f"restart {UNIT}"]


def test_revert_leaves_a_host_whose_links_could_not_be_read_before_its_deploy(
    fleet: Fleet, clock: Clock
) -> None:
    """ssh failed when the links were read before the deploy, whose planning then failed
    (nothing changed on the host): what this rollout switched is not known, so nothing is
    swapped back (a swap would put chat on M0, older than what it ran before the rollout)."""
    failed_reads: list[list[str]] = []

    def runner(argv: list[str]) -> subprocess.CompletedProcess[str]:
        if isinstance(argv, DeployRequest):
            fleet.calls.append(argv)
            return subprocess.CompletedProcess(argv, 1, "", "[a] Error: could not plan\n")
        if not failed_reads:
            failed_reads.append(argv)
            return subprocess.CompletedProcess(argv, 255, "", "ssh: connection reset\n")
        return fleet(argv)

    report = rollout(
        "inv.py", fleet.inventory, hosts=["a"], timeout=3, revert=True, runner=runner, say=print
    )
    assert report.lines() == [
        "a: FAILED: canary: deploy failed: [a] Error: could not plan; "
        "not reverted: the model links could not be read before the deploy",
    ]
    assert fleet.current("a", "chat") == f"{STORE}/{M1}"
    assert fleet.current("a", "chat", "previous") == f"{STORE}/{M0}"
    assert fleet.systemctl("a") == [] and fleet.deploys() == [["a"]]


def test_revert_says_so_when_the_links_cannot_be_read_after_the_deploy(fleet: Fleet) -> None:
    """ssh fails when _revert reads the links after the deploy: nothing is swapped, and the
    report says the links could not be read (not that nothing was switched, which is not
    known)."""
    host = fleet.inventory.hosts["a"]
    before = current_links(host, fleet)

    def unreachable(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 255, "", "ssh: connection refused\n")

    assert _revert(host, before, unreachable, 3) == (
        "not reverted: the model links could not be read after the deploy (ssh: connection refused)"
    )

    def silent(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 255, "", " \n")

    assert _revert(host, before, silent, 3).endswith("after the deploy (exit status 255)")
    assert fleet.systemctl("a") == [] and fleet.current("a", "chat") == f"{STORE}/{M1}"
