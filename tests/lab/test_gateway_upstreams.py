"""A gateway host in front of another node (``gateway.upstreams``), on real lab hosts: real
HAProxy on lab-02 with its certificate from the lab's OpenBao PKI, the real model (llama.cpp
on the CPU) on lab-01, each host's real nftables ruleset between them.

The lab is `gpunode lab up --front-door` (the model, the PKI, the demo client), deployed
with a data file that turns lab-01's own gateway off and makes lab-02 the gateway in front
of it. What a client sees is asked from the controller (this machine), what the gateway
sees from lab-02.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpunode.commands import lab_front_door as door
from gpunode.config import _deep_merge
from gpunode.paths import REPO_ROOT

from .conftest import (
    TEST_LAB_ENV,
    Hidden,
    Lab,
    gpunode,
    planned_changes,
    pyinfra,
    require_root,
)

INVENTORY = "inventories/lab.py"
DEPLOY = "deploys/gpu_node.py"
GATEWAY, UPSTREAM = "lab-02", door.HOST


def data_file(path: Path) -> Path:
    """inventories/lab.yml, with lab-01's gateway off and lab-02 the gateway in front of it
    (the same port, PKI role and clients as the front door's)."""
    doc = yaml.safe_load((REPO_ROOT / "inventories" / "lab.yml").read_text())
    gateway = {
        "enabled": True,
        "port": door.GATEWAY_PORT,
        "upstreams": [UPSTREAM],
        "tls": {"mount": door.PKI_MOUNT, "role": door.PKI_ROLE},
        "clients": {door.CLIENT: {"key": {"path": door.CLIENT_PATH}, "rate": 20, "burst": 40}},
    }
    doc = _deep_merge(
        doc,
        {
            "groups": {door.GROUP: {"data": {"gateway": {"enabled": False}}}},
            "hosts": {GATEWAY: {"data": {"gateway": gateway}}},
        },
    )
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_root()
    env = dict(TEST_LAB_ENV)
    gpunode("lab", "down", env=env)
    up = gpunode("lab", "up", "--hosts", "2", "--front-door", env=env, timeout=5400)
    if up.returncode != 0:
        pytest.fail(f"the lab did not start:\n{up.stdout}\n{up.stderr}")
    env["GPUNODE_LAB_DATA"] = str(data_file(tmp_path_factory.mktemp("upstreams") / "lab.yml"))
    state_dir = REPO_ROOT / ".lab" / env["GPUNODE_LAB_NAME"]
    the_lab = Lab(env=env, state_dir=state_dir, hosts=["lab-01", "lab-02"])
    done = pyinfra(INVENTORY, DEPLOY, env=env, timeout=1800)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    # Ready when the gateway says so: its health checks (2 s apart, 2 to rise) may have
    # seen lab-01's model still loading while the deploy ran.
    deadline = time.monotonic() + 60
    while call(the_lab, "/health", None) != 200:
        assert time.monotonic() < deadline, "lab-02's gateway never saw lab-01's model up"
        time.sleep(1)
    yield the_lab
    gpunode("lab", "down", env=env, check=True)


def demo_key(lab: Lab) -> Hidden:
    return Hidden((lab.state_dir / "gateway-demo.key").read_text().strip())


def call(lab: Lab, path: str, key: str | None, body: dict[str, Any] | None = None) -> int:
    """One request to lab-02's gateway from the controller, TLS verified against the
    Vault CA; the HTTP status."""
    url = f"https://{lab.address(GATEWAY)}:{door.GATEWAY_PORT}{path}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data)  # noqa: S310
    req.add_header("Content-Type", "application/json")
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    context = ssl.create_default_context(cafile=str(lab.state_dir / "gateway-ca.pem"))
    try:
        with urllib.request.urlopen(req, timeout=120, context=context) as resp:  # noqa: S310
            answer = json.loads(resp.read() or b"{}")
            if path == "/v1/chat/completions":
                assert answer["choices"][0]["message"]["content"].strip()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def chat() -> dict[str, Any]:
    return {
        "model": door.SERVED_NAME,
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 8,
    }


def reaches(address: str, port: int) -> bool:
    """A TCP connection from the controller (the firewall drops: a timeout)."""
    try:
        socket.create_connection((address, port), timeout=3).close()
    except OSError:
        return False
    return True


def test_the_model_on_lab01_answers_through_the_gateway_on_lab02(lab: Lab) -> None:
    status = call(lab, "/v1/chat/completions", demo_key(lab), chat())  # no key in a failure
    assert status == 200
    assert call(lab, "/v1/chat/completions", None, chat()) == 401
    assert call(lab, "/v1/chat/completions", "wrong-key", chat()) == 401
    assert call(lab, "/health", None) == 200


def test_the_upstreams_port_lets_the_gateway_in_and_no_one_else(lab: Lab) -> None:
    upstream = lab.address(UPSTREAM)
    assert not reaches(upstream, door.SERVICE_PORT)  # the controller is in app_cidrs
    assert not reaches(upstream, door.GATEWAY_PORT)  # lab-01's own gateway is off
    url = f"http://{upstream}:{door.SERVICE_PORT}/health"
    on_gateway = lab.ssh(GATEWAY, f"curl -fsS -o /dev/null --max-time 5 {url}")
    assert on_gateway.returncode == 0, on_gateway.stderr
    # The rule that lets it in names lab-02 alone.
    ruleset = lab.ssh(UPSTREAM, "nft list table inet gpunode", check=True).stdout
    lines = [ln for ln in ruleset.splitlines() if re.search(rf"\b{door.SERVICE_PORT}\b", ln)]
    assert lines and all(f"saddr {lab.address(GATEWAY)} " in line for line in lines), lines


def test_a_second_deploy_changes_nothing(lab: Lab) -> None:
    assert planned_changes(INVENTORY, DEPLOY, lab.env) == {}


def test_verify_passes_on_both_hosts(lab: Lab) -> None:
    proc = gpunode("verify", INVENTORY, env=lab.env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_an_upstream_down_is_503_and_back_is_200(lab: Lab) -> None:
    unit = f"gpunode-inference-{door.SERVICE}.service"
    lab.ssh(UPSTREAM, f"systemctl stop {unit}", check=True)
    try:
        deadline = time.monotonic() + 30
        while call(lab, "/health", None) != 503:
            assert time.monotonic() < deadline, "/health stayed 200 with the upstream down"
            time.sleep(0.5)
        status = call(lab, "/v1/chat/completions", demo_key(lab), chat())
        assert status == 503
    finally:
        lab.ssh(UPSTREAM, f"systemctl start {unit}", check=True)
    deadline = time.monotonic() + 120
    while call(lab, "/health", None) != 200:
        assert time.monotonic() < deadline, "/health did not come back"
        time.sleep(1)
    status = call(lab, "/v1/chat/completions", demo_key(lab), chat())
    assert status == 200


def test_moving_the_gateways_away_opens_the_port_to_the_clients_again(
    lab: Lab, tmp_path: Path
) -> None:
    """Last: lab-02's gateway off. lab-01's service is then a plain service on app_cidrs
    (its port answers the controller), the rule naming lab-02 is gone."""
    doc = yaml.safe_load(Path(lab.env["GPUNODE_LAB_DATA"]).read_text())
    doc["hosts"][GATEWAY]["data"]["gateway"]["enabled"] = False
    path = tmp_path / "lab.yml"
    path.write_text(yaml.safe_dump(doc))
    env = {**lab.env, "GPUNODE_LAB_DATA": str(path)}
    done = pyinfra(INVENTORY, DEPLOY, env=env, timeout=1800)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    deadline = time.monotonic() + 60
    while not reaches(lab.address(UPSTREAM), door.SERVICE_PORT):
        assert time.monotonic() < deadline, "lab-01's service did not open to app_cidrs"
        time.sleep(1)
    ruleset = lab.ssh(UPSTREAM, "nft list table inet gpunode", check=True).stdout
    assert f"saddr {lab.address(GATEWAY)} " not in ruleset
