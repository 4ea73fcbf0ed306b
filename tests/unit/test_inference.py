"""Inference services: config checks, runtime command lines, the rendered units (checked by
systemd's own ``systemd-analyze verify`` and scored by ``systemd-analyze security``), the
role's operations through pyinfra's ``@fake`` connector, and the rollout order.

fixtures/nvidia-proc/h100-information is ``/proc/driver/nvidia/gpus/0000:62:00.0/information``
of an H100 80GB HBM3 on driver 535.129.03 (values as published in a public GPU-debugging
note; field layout ``"Name: \\t value"`` as written by the driver's nv-procfs.c).
"""

from __future__ import annotations

import http.server
import re
import shlex
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from harness import Run, host_info_output, run_deploys, run_sh
from pyinfra.facts.server import Os

from gpunode import provenance
from gpunode.commands.rollout import batches, rollout
from gpunode.config import load
from gpunode.facts.nvidia import NvidiaGpuMinors
from gpunode.facts.server import HostInfo
from gpunode.inference import (
    Installed,
    app_ports,
    gpu_devices,
    metrics_endpoints,
    render_unit,
    render_values,
)
from gpunode.runtimes import command_line
from gpunode.schema.node import NodeConfig
from gpunode.schema.runtimes import PROFILES
from gpunode.schema.types import ConfigError
from roles.inference_systemd import inference_systemd

FIXTURES = Path(__file__).parent / "fixtures"
HOST = "gpu-01"
H100 = "GPU-9221d5d1-b60b-a624-bf14-0a1819cfda3b"
H100_B = "GPU-0f9a4b2c-1d3e-4f50-8a6b-7c8d9e0f1a2b"
SHA_A, SHA_B, SHA_C = "a" * 64, "b" * 64, "c" * 64
# systemd-analyze security --offline exposure, at most (measured: test below, docs/inference.md)
THRESHOLD = {"cpu": 1.2, "gpu": 1.7}


def example() -> dict[str, Any]:
    """One service per runtime, as in docs/inference.md."""
    return {
        "distro": "debian12",
        "firewall": {"enabled": False},  # on by default: the firewall role's concern, not these
        "gpu": {"count": 4, "model": "H100-SXM-80GB"},
        "vault": {"addr": "https://vault.example.com:8200"},
        "secrets": {
            "chat-key": {"path": "llm/chat", "key": "api_key", "env": "LLAMA_API_KEY"},
            "big-key": {
                "path": "llm/big",
                "key": "api_key",
                "env": "VLLM_API_KEY",
                "group": "gpunode-big",
            },
        },
        "inference": {
            "runtimes": {
                "vllm": {"method": "pip", "packages": ["vllm==0.6.6.post1"]},
                "llamacpp": {
                    "method": "artifact",
                    "artifact": {
                        "uri": "http://mirror.internal/llama-server.tar.gz",
                        "sha256": SHA_A,
                        "format": "tar",
                    },
                },
                "triton": {
                    "method": "artifact",
                    "artifact": {
                        "uri": "http://mirror.internal/tritonserver-2.51.0.tar.gz",
                        "sha256": SHA_B,
                        "format": "tar",
                    },
                },
            },
            "services": {
                "big": {
                    "runtime": "vllm",
                    "port": 8000,
                    "gpus": [H100, H100_B],
                    "tensor_parallel": 2,
                    "context_length": 8192,
                    "api_key_secret": "big-key",
                    "min_free_mib": 70000,
                    "model": {
                        "uri": "file:///mnt/models/llama-3.1-8b-instruct.tar",
                        "sha256": SHA_C,
                        "format": "tar",
                        "subpath": "Llama-3.1-8B-Instruct",
                        "served_name": "llama-3.1-8b",
                        # config.json of Llama-3.1-8B: 32 layers, 8 KV heads of 128
                        "footprint": {
                            "parameters": "8B",
                            "dtype": "bf16",
                            "layers": 32,
                            "kv_heads": 8,
                            "head_dim": 128,
                            "batch": 16,
                        },
                    },
                },
                "chat": {
                    "runtime": "llamacpp",
                    "port": 8080,
                    "threads": 8,
                    "context_length": 4096,
                    "api_key_secret": "chat-key",
                    "model": {"uri": "http://mirror.internal/smollm2.gguf", "sha256": SHA_A},
                },
                "vision": {
                    "runtime": "triton",
                    "port": 8100,
                    "gpus": ["GPU-11111111-2222-3333-4444-555555555555"],
                    "model": {
                        "uri": "http://mirror.internal/repo.tar.gz",
                        "sha256": SHA_B,
                        "format": "tar",
                    },
                },
            },
        },
    }


def load_node(data: dict[str, Any]) -> NodeConfig:
    raw = {"defaults": data, "hosts": {HOST: {"connection": {"address": "192.0.2.10"}}}}
    return load(raw, source="inv.yml").hosts[HOST].config


def problems(mutate) -> str:
    data = example()
    mutate(data)
    with pytest.raises(ConfigError) as exc:
        load_node(data)
    return str(exc.value)


def services(data: dict[str, Any]) -> dict[str, Any]:
    return data["inference"]["services"]


# --- config -------------------------------------------------------------------------------


def test_example_is_valid_and_opens_its_api_ports() -> None:
    config = load_node(example())
    assert app_ports(config) == [("tcp", 8000), ("tcp", 8080), ("tcp", 8100), ("tcp", 8101)]
    assert metrics_endpoints(config) == [
        ("big", 8000, "/metrics"),
        ("chat", 8080, "/metrics"),
        ("vision", 8102, "/metrics"),
    ]


def test_no_services_open_no_ports() -> None:
    data = example()
    del data["inference"]
    assert app_ports(load_node(data)) == []


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda d: d["inference"]["runtimes"].pop("triton"),
            "inference.services.vision.runtime: triton has no install entry (allowed: add "
            "inference.runtimes.triton with method pip, package or artifact)",
        ),
        (
            lambda d: services(d)["chat"].update(port=8000),
            "inference.services.chat.port: 8000 is already used by inference.services.big",
        ),
        (
            lambda d: services(d)["chat"].update(port=8101),
            "inference.services.vision.grpc_port: 8101 is already used by inference.services.chat",
        ),
        (
            lambda d: services(d)["big"].update(gpus=[]),
            "inference.services.big.gpus: vLLM (OpenAI-compatible server) needs a GPU",
        ),
        (
            lambda d: services(d)["big"].update(tensor_parallel=4),
            "inference.services.big.tensor_parallel: 4 but 2 GPUs listed (allowed: 2",
        ),
        (
            lambda d: services(d)["chat"].update(tensor_parallel=2),
            "inference.services.chat.tensor_parallel: llama.cpp llama-server (GGUF) has no "
            "tensor-parallel flag",
        ),
        (
            lambda d: services(d)["vision"].update(gpus=[H100]),
            f"inference.services.vision.gpus: {H100} is already used by inference.services.big",
        ),
        (
            lambda d: d["gpu"].update(count=1),
            "inference.services.big.gpus: 2 GPUs but the node declares gpu.count 1",
        ),
        (
            lambda d: services(d)["chat"].update(api_key_secret="nope"),  # noqa: S106
            "inference.services.chat.api_key_secret: 'nope' is not a declared secret "
            "(allowed: chat-key, big-key)",
        ),
        (
            lambda d: d["secrets"]["chat-key"].pop("env"),
            "inference.services.chat.api_key_secret: secrets.chat-key writes the variable "
            "API_KEY, llama.cpp llama-server (GGUF) reads LLAMA_API_KEY (allowed: set "
            "secrets.chat-key.env: LLAMA_API_KEY)",
        ),
        (
            lambda d: d["secrets"]["chat-key"].update(group="llm"),
            "secrets.chat-key is owned root:llm (allowed: root:gpunode-chat or root:root",
        ),
        (
            lambda d: services(d)["vision"].update(api_key_secret="chat-key"),  # noqa: S106
            "inference.services.vision.api_key_secret: NVIDIA Triton Inference Server has no "
            "API key of its own",
        ),
        (
            lambda d: services(d)["vision"].update(context_length=4096),
            "inference.services.vision.context_length: NVIDIA Triton Inference Server takes "
            "it from the model's config",
        ),
        (
            lambda d: services(d)["chat"]["model"].update(format="tar"),
            "inference.services.chat.model.format: tar, but llama.cpp llama-server (GGUF) "
            "loads a single model file (allowed: file)",
        ),
        (
            lambda d: services(d)["chat"]["model"].update(sha256="ABC"),
            "inference.services.chat.model.sha256: 'ABC' is not allowed",
        ),
        (
            lambda d: services(d)["chat"]["model"].update(uri="http://user:pw@mirror/m.gguf"),
            "inference.services.chat.model.uri: 'http://***@mirror/m.gguf' is not allowed",
        ),
        (
            lambda d: services(d)["chat"]["model"].update(uri="ftp://mirror/m.gguf"),
            "inference.services.chat.model.uri: 'ftp://mirror/m.gguf' is not allowed",
        ),
        (
            lambda d: services(d)["big"]["model"].update(subpath="a/../../etc"),
            "inference.services.big.model.subpath: 'a/../../etc' leaves its directory",
        ),
        (
            lambda d: services(d)["chat"].update(extra_args=["--x", "$(reboot)"]),
            "inference.services.chat.extra_args[1]: '$(reboot)' is not allowed",
        ),
        (
            lambda d: d["inference"]["runtimes"]["vllm"].update(packages=["vllm>=0.6"]),
            "inference.runtimes.vllm.packages[0]: 'vllm>=0.6' is not allowed",
        ),
        (
            lambda d: d["inference"]["runtimes"]["vllm"].update(packages=[]),
            "inference.runtimes.vllm: method pip needs packages (allowed: set packages)",
        ),
        (
            lambda d: services(d).update({"Bad_Name": services(d)["chat"]}),
            "inference.services.Bad_Name.(name): 'Bad_Name' is not allowed (allowed: a-z, 0-9",
        ),
    ],
)
def test_bad_input_is_refused_at_load_with_a_clear_message(mutate, expected: str) -> None:
    message = problems(mutate)
    assert expected in message, message
    assert message.startswith(("inv.yml: host gpu-01", "inv.yml: defaults")), message
    assert "(allowed: " in message


def test_the_planner_refuses_a_model_that_does_not_fit() -> None:
    def bigger(d: dict[str, Any]) -> None:
        services(d)["big"]["model"]["footprint"].update(parameters="70B", layers=80)

    message = problems(bigger)
    assert (
        "inv.yml: host gpu-01: inference.services.big: model llama-3.1-8b does not fit node "
        "gpu-01: it needs 94.7 GiB per GPU over 2 GPUs" in message
    ), message
    assert "(8192 tokens x 16 in fp16)" in message  # the service's context_length counts


def test_a_footprint_needs_a_declared_gpu_model() -> None:
    message = problems(lambda d: d["gpu"].pop("model"))
    assert (
        "inference.services.big.model.footprint: the node declares no gpu.model, so the "
        "planner cannot check the model fits (allowed: set gpu.model" in message
    )


# --- runtime command lines ------------------------------------------------------------------


def values_for(name: str) -> tuple[NodeConfig, dict[str, object]]:
    config = load_node(example())
    svc = config.inference.services[name]
    root = "/var/lib/gpunode/runtimes/sha256/" + SHA_B + "/root"
    installed = Installed(f"/opt/x/bin/{name}", root if name == "vision" else None, "v", [])
    return config, render_values(name, svc, config, installed)


def test_vllm_command_line() -> None:
    _, v = values_for("big")
    assert v["exec_start"] == (
        "/opt/x/bin/big serve /var/lib/gpunode/inference/big/current/model/Llama-3.1-8B-Instruct "
        "--host 0.0.0.0 --port 8000 --served-model-name llama-3.1-8b --tensor-parallel-size 2 "
        "--max-model-len 8192"
    )
    env = dict(v["environment"])  # type: ignore[call-overload]
    assert env["CUDA_VISIBLE_DEVICES"] == f"{H100},{H100_B}"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert v["env_file"] == "/etc/gpunode/secrets/big-key.env"


def test_llamacpp_command_line_keeps_the_key_off_it() -> None:
    _, v = values_for("chat")
    assert v["exec_start"] == (
        "/opt/x/bin/chat -m /var/lib/gpunode/inference/chat/current/model --host 0.0.0.0 "
        "--port 8080 --alias chat -c 4096 -t 8 --metrics"
    )
    assert PROFILES["llamacpp"].api_key_env == "LLAMA_API_KEY"  # read from EnvironmentFile
    assert dict(v["environment"])["CUDA_VISIBLE_DEVICES"] == ""  # type: ignore[call-overload]


def test_triton_command_line() -> None:
    _, v = values_for("vision")
    root = "/var/lib/gpunode/runtimes/sha256/" + SHA_B + "/root"
    assert v["exec_start"] == (
        "/opt/x/bin/vision --model-repository=/var/lib/gpunode/inference/vision/current/model "
        "--http-address=0.0.0.0 --http-port=8100 --grpc-address=0.0.0.0 --grpc-port=8101 "
        f"--metrics-port=8102 --backend-directory={root}/backends --strict-readiness=true "
        "--exit-on-error=true"
    )
    assert dict(v["environment"])["LD_LIBRARY_PATH"] == f"{root}/lib"  # type: ignore[call-overload]
    assert v["env_file"] is None


def test_profiles_declare_their_endpoints() -> None:
    assert {n: (p.health_path, p.models_path, p.metrics_path) for n, p in PROFILES.items()} == {
        "vllm": ("/health", "/v1/models", "/metrics"),
        "llamacpp": ("/health", "/v1/models", "/metrics"),
        "triton": ("/v2/health/ready", "/v2/models/stats", "/metrics"),
    }
    assert command_line(PROFILES["llamacpp"], {"model": "/m", "listen": "::", "port": 1}) == [
        "-m",
        "/m",
        "--host",
        "::",
        "--port",
        "1",
        "--metrics",
    ]


# --- the units, checked by systemd itself -----------------------------------------------------


def unit_text(name: str, executable: str | None = None) -> str:
    config, values = values_for(name)
    svc = config.inference.services[name]
    minors = {H100: 5, H100_B: 6, "GPU-11111111-2222-3333-4444-555555555555": 0}
    devices = gpu_devices(svc, minors)
    assert devices is not None
    if executable:  # systemd-analyze verify wants the programs to exist
        values["exec_start"] = re.sub(r"^\S+", executable, str(values["exec_start"]))
        values["probe"] = executable
    return render_unit(values, devices)


@pytest.mark.parametrize("name", ["big", "chat", "vision"])
def test_unit_passes_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze is missing (apt: systemd)")
    unit = tmp_path / f"gpunode-inference-{name}.service"
    unit.write_text(unit_text(name, executable="/bin/true"))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


@pytest.mark.parametrize(("name", "kind"), [("big", "gpu"), ("chat", "cpu"), ("vision", "gpu")])
def test_unit_exposure_is_at_most_the_threshold(name: str, kind: str, tmp_path: Path) -> None:
    unit = tmp_path / f"gpunode-inference-{name}.service"
    unit.write_text(unit_text(name))
    proc = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=true",
            f"--threshold={THRESHOLD[kind] * 10:.0f}",
            "--no-pager",
            str(unit),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout)
    assert score, proc.stdout + proc.stderr
    print(f"{name} ({kind}): exposure {score[1]}")
    assert float(score[1]) <= THRESHOLD[kind]
    assert proc.returncode == 0  # --threshold: exit 1 when the score is above it


def test_units_sandbox_settings() -> None:
    chat, big = unit_text("chat"), unit_text("big")
    for text in (chat, big):
        for line in (
            "NoNewPrivileges=yes",
            "CapabilityBoundingSet=",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "Restart=on-failure",
            "StartLimitBurst=5",
            "UMask=0077",
        ):
            assert f"\n{line}\n" in text, line
    assert "\nReadWritePaths=/var/cache/gpunode/inference/chat\n" in chat
    assert "\nMemoryMax=90%\n" in chat and "\nLimitMEMLOCK=infinity\n" in chat
    assert "\nEnvironmentFile=/etc/gpunode/secrets/chat-key.env\n" in chat
    # CPU: no devices at all, W^X memory; GPU: only its own device nodes, the probe first
    assert "\nPrivateDevices=yes\n" in chat and "\nMemoryDenyWriteExecute=yes\n" in chat
    assert "DeviceAllow" not in chat and "ExecStartPre" not in chat
    assert re.findall(r"^DeviceAllow=(.*)$", big, re.M) == [
        "/dev/nvidia-uvm rw",
        "/dev/nvidia-uvm-tools rw",
        "/dev/nvidia5 rw",
        "/dev/nvidia6 rw",
        "/dev/nvidiactl rw",
    ]
    assert "\nPrivateDevices=no\nDevicePolicy=closed\n" in big
    assert "MemoryDenyWriteExecute" not in big  # vLLM JIT-compiles kernels
    assert (
        "\nExecStartPre=/usr/local/sbin/gpunode-probe --check --min-gpus 2 --min-free-mib 70000\n"
        in big
    )


# --- GPU facts, from the driver's recorded /proc file -------------------------------------------


def minors_output() -> list[str]:
    command = NvidiaGpuMinors().command()
    fixture = shlex.quote(str(FIXTURES / "nvidia-proc" / "h100-information"))
    out = run_sh(command.replace("/proc/driver/nvidia/gpus/*/information", fixture))
    assert out["success"]
    return out["stdout"].splitlines()


def test_gpu_minor_fact_parses_the_driver_file() -> None:
    assert NvidiaGpuMinors().process(minors_output()) == {H100: 5}
    none = run_sh(NvidiaGpuMinors().command().replace("/proc/driver", "/nonexistent"))
    assert none["success"] and NvidiaGpuMinors().process(none["stdout"].splitlines()) == {}


# --- the role, through pyinfra's fake connector --------------------------------------------------


def run_role(config: NodeConfig, handlers: tuple = ()) -> Run:
    responses: dict[Any, Any] = {
        HostInfo().command(): list(host_info_output("debian12")),
        NvidiaGpuMinors().command(): minors_output(),
        Os().command(): "Linux",  # uname -s
        "command -v useradd || true": "/usr/sbin/useradd",  # Debian's passwd package
    }
    return run_deploys(config, responses, [inference_systemd], handlers, host_name=HOST)


def one_gpu_service(uuid: str = H100) -> NodeConfig:
    data = example()
    data["inference"]["services"] = {
        "big": {**services(data)["big"], "gpus": [uuid], "tensor_parallel": 1}
    }
    return load_node(data)


def test_a_node_without_services_gets_no_operation() -> None:
    data = example()
    del data["inference"]
    run = run_role(load_node(data))
    assert run.commands == [] and not run.failed


def test_gpu_service_on_a_fresh_host() -> None:
    run = run_role(one_gpu_service())
    assert not run.failed
    joined = "\n".join(run.commands)
    # the runtime venv from its lock (uploaded, installed with hashes checked), the model
    # fetched and verified, then the link
    assert any("vllm==0.6.6.post1 " in c for p, c in run.uploads if p.endswith(".lock.txt"))
    assert any("--require-hashes" in c for c in run.commands)
    assert "u=file:///mnt/models/llama-3.1-8b-instruct.tar" in joined
    assert f'if [ "$got" != {SHA_C} ]' in joined
    fetch = next(i for i, c in enumerate(run.commands) if "mktemp -d" in c and SHA_C in c)
    link = next(i for i, c in enumerate(run.commands) if ".current.new" in c)
    assert fetch < link
    unit = dict(run.uploads)["/etc/systemd/system/gpunode-inference-big.service"]
    assert re.findall(r"^DeviceAllow=(.*)$", unit, re.M) == [
        "/dev/nvidia-uvm rw",
        "/dev/nvidia-uvm-tools rw",
        "/dev/nvidia5 rw",
        "/dev/nvidiactl rw",
    ]
    assert f"Environment=CUDA_VISIBLE_DEVICES={H100}\n" in unit
    assert any("systemctl daemon-reload" in c for c in run.commands)
    assert re.search(r"systemctl start gpunode-inference-big\.service", joined)
    assert any("until curl -fsS -o /dev/null" in c for c in run.commands)  # waits for health
    assert not any("systemctl restart" in c for c in run.commands)  # started once, not twice


def test_a_gpu_that_is_not_on_the_host_fails_it_with_the_uuids() -> None:
    other = "GPU-deadbeef-0000-1111-2222-333344445555"
    run = run_role(one_gpu_service(other))
    assert run.failed
    assert any(
        f"inference.services.big.gpus: {other} not found (GPUs here: {H100})" in out.stderr
        for _, _, out in run.results
    )
    assert not any(".current.new" in c for c in run.commands)


def test_no_secret_value_or_data_in_operation_names() -> None:
    run = run_role(one_gpu_service())
    names = [label for label in run.op_labels if isinstance(label, str)]
    for name in names:
        assert SHA_C not in name and "mirror" not in name and "/mnt/" not in name, name


def chat_only() -> NodeConfig:
    data = example()
    data["inference"]["services"] = {"chat": services(data)["chat"]}
    return load_node(data)


def test_the_secret_version_in_this_run_is_what_restarts_the_service() -> None:
    # the secrets role records the Vault version it deploys (never the value) before this role
    provenance._RECORDS.setdefault(f"@fake/{HOST}", {})["secrets"] = {"chat-key": 3}
    try:
        run = run_role(chat_only())
    finally:
        provenance._RECORDS.pop(f"@fake/{HOST}", None)
    assert not run.failed
    uploads = dict(run.uploads)
    assert uploads["/var/lib/gpunode/inference/chat/secret.version"] == "chat-key 3\n"
    unit = uploads["/etc/systemd/system/gpunode-inference-chat.service"]
    assert "EnvironmentFile=/etc/gpunode/secrets/chat-key.env\n" in unit
    assert "MemoryDenyWriteExecute=yes" in unit and "DeviceAllow" not in unit


def test_provenance_records_digests_and_versions() -> None:
    run_role(chat_only())
    assert provenance.recorded(f"@fake/{HOST}")["inference"] == {
        "chat": {
            "runtime": "llamacpp",
            "runtime_version": f"sha256:{SHA_A}",
            "model_uri": "http://mirror.internal/smollm2.gguf",
            "model_sha256": SHA_A,
            "unit": "gpunode-inference-chat.service",
        }
    }


# --- rollout order ----------------------------------------------------------------------------


def test_rollout_batches_canary_first() -> None:
    hosts = ["a", "b", "c", "d", "e", "f"]
    assert batches(hosts, canary=1, batch_size=1) == [["a"], ["b"], ["c"], ["d"], ["e"], ["f"]]
    assert batches(hosts, canary=2, batch_size=3) == [["a", "b"], ["c", "d", "e"], ["f"]]
    assert batches(hosts, canary=0, batch_size=4) == [["a", "b", "c", "d"], ["e", "f"]]
    assert batches([], canary=1) == []
    with pytest.raises(ValueError):
        batches(hosts, batch_size=0)


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_rollout_stops_at_the_first_unhealthy_batch() -> None:
    """Real HTTP health checks against 127.0.0.1 (a real server) and 127.0.0.2 (nothing
    listens); the deploy runner records what it was asked to run instead of running pyinfra."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        data = example()
        data["inference"]["services"] = {
            "chat": {**services(data)["chat"], "port": port, "health_timeout": 5}
        }
        raw = {
            "defaults": data,
            "hosts": {
                "a": {"connection": {"address": "127.0.0.1"}},
                "b": {"connection": {"address": "127.0.0.1", "port": 2222}},
                "c": {"connection": {"address": "127.0.0.2"}},
                "d": {"connection": {"address": "127.0.0.3"}},
            },
        }
        inv = load(raw, source="inv.yml")
        calls: list[list[str]] = []

        def runner(argv: list[str]) -> subprocess.CompletedProcess[str]:
            calls.append(argv)
            return subprocess.CompletedProcess(argv, 0, "", "")

        said: list[str] = []
        report = rollout(
            "inv.py", inv, canary=1, batch_size=2, timeout=1, runner=runner, say=said.append
        )
    finally:
        server.shutdown()
    deploys = [c for c in calls if "pyinfra" in c]
    assert [c[c.index("deploys/gpu_node.py") + 1 :] for c in deploys] == [
        ["--limit", "a"],
        ["--limit", "b", "--limit", "c"],
    ]
    assert said == ["rollout: canary: a", "rollout: batch 1: b, c"]
    assert not report.ok
    assert report.lines()[:2] == [
        "a: ok: canary: deployed and healthy",
        "b: ok: batch 1: deployed and healthy",
    ]
    assert report.lines()[2].startswith(
        f"c: FAILED: batch 1: chat: http://127.0.0.2:{port}/health not healthy after 1s"
    )
    assert report.lines()[3] == "not touched (rollout stopped): d"


def test_a_service_run_as_a_nomad_job_gets_no_systemd_unit() -> None:
    data = example()
    big = {**services(data)["big"], "gpus": [H100], "tensor_parallel": 1}
    big["model"] = {**big["model"], "uri": "https://models.example.com/llama-3.1-8b.tar"}
    data["inference"]["services"] = {"big": big, "chat": services(data)["chat"]}
    data["nomad"] = {
        "enabled": True,
        "servers": ["10.0.0.1:4647"],
        "device_plugin": {"sha256": "a" * 64},
        "images": {"vllm": "vllm/vllm-openai@sha256:" + "b" * 64},
        "jobs": {"big": {}},
    }
    run = run_role(load_node(data))
    assert not run.failed
    units = [path for path, _ in run.uploads if path.startswith("/etc/systemd/system/")]
    assert "/etc/systemd/system/gpunode-inference-big.service" not in units
    assert "/etc/systemd/system/gpunode-inference-chat.service" in units
    # Its runtime is not installed either (vLLM's pins reach pip only through its lock file).
    assert not any("/opt/gpunode/venvs/vllm-" in c for c in run.commands)
    assert not any(p.startswith("/opt/gpunode/venvs/vllm-") for p, _ in run.uploads)


# --- finding 6 of issue 13: vLLM's API key guards only some routes --------------------------


def test_a_vllm_service_beyond_loopback_is_reported_on_every_run(capsys) -> None:
    from gpunode.inventory import _REPORTED, report

    data = example()
    raw = {"defaults": data, "hosts": {HOST: {"connection": {"address": "192.0.2.10"}}}}
    _REPORTED.clear()
    report(load(raw, source="inv.yml"))
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "inference.services.big" in x)
    assert "0.0.0.0:8000" in line and "/invocations" in line and "/tokenize" in line
    assert f"hosts: {HOST}" in line
    # llama.cpp and Triton guard every route they serve (or have no key): nothing said.
    assert "inference.services.chat" not in err and "inference.services.vision" not in err

    services(data)["big"]["listen"] = "127.0.0.1"
    _REPORTED.clear()
    report(load(raw, source="inv.yml"))
    assert "inference.services.big" not in capsys.readouterr().err


def test_a_runtime_with_its_own_metrics_port_is_open_to_the_monitoring_cidrs() -> None:
    """Triton serves /metrics on a port of its own (the API port + 2 by default): the
    firewall opens it to network.monitoring_cidrs (it was opened to no one)."""
    from gpunode.firewall import allow_rules

    data = example()
    data["firewall"] = {"enabled": True}
    data["network"] = {
        "admin_cidrs": ["192.0.2.0/28"],
        "app_cidrs": ["198.51.100.0/24"],
        "monitoring_cidrs": ["203.0.113.0/28"],
        "cluster_cidrs": [],
    }
    rules = {r.name: r for r in allow_rules(load_node(data), 22)}
    assert 8102 in rules["metrics"].ports and 8102 not in rules["inference"].ports
    assert [str(c) for c in rules["metrics"].cidrs] == ["203.0.113.0/28"]
