"""Nomad job rendering (gpunode/nomad_jobs.py) for every runtime profile.

Each rendered job is checked against the JSON job structure of Nomad's HTTP API: the Go
structs of hashicorp/nomad's ``api`` package (``Job``, ``TaskGroup``, ``Task``,
``Resources``, ``RequestedDevice``, ``Service``, ``ServiceCheck``, ``Template``, ``Vault``,
``TaskArtifact``...), copied verbatim into ``fixtures/nomad/api-structs.go`` (sources in
``fixtures/nomad/SOURCES.md``) and parsed here: every key must be a field of the struct
at that place and every value of the field's Go type (strings, integers for ints and
``time.Duration`` nanoseconds, booleans, lists, maps, nested structs). Then the content:
GPUs as ``nvidia/gpu`` devices with constraints, the model artifact with its sha256, the
API key only through a Vault template, the command line from the runtime profile (the
one the systemd unit uses), health checks, update/restart/reschedule policies.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from harness import IMAGES, RUNTIME_INSTALLS, SECRETS, SERVICES, SHA_MODEL, SHA_TAR

from gpunode.commands.nomad import command
from gpunode.config import load
from gpunode.nomad_jobs import CONTAINERS, render_job
from gpunode.runtimes import command_line
from gpunode.schema.node import NodeConfig
from gpunode.schema.runtimes import PROFILES
from gpunode.schema.types import ConfigError

STRUCTS = Path(__file__).parent / "fixtures" / "nomad" / "api-structs.go"
HOST = "gpu-01"
ANY = "0.0.0.0"  # noqa: S104 - the listen address inside the container


def node_config(jobs: dict[str, Any] | None = None, **nomad: Any) -> NodeConfig:
    settings: dict[str, Any] = {
        "enabled": True,
        "servers": ["10.0.0.10:4647"],
        "device_plugin": {"sha256": "f" * 64},
        "datacenter": "gpu-dc1",
        "images": IMAGES,
        "jobs": jobs if jobs is not None else {
            "chat": {"gpu_memory_min": "40 GiB", "gpu_model": "NVIDIA H100 80GB HBM3", "count": 2},
            "small": {},
            "vision": {"gpu_memory_min": "16 GiB"},
        },
    }  # fmt: skip
    settings.update(nomad)
    raw = {
        "defaults": {
            "distro": "ubuntu2404",
            "firewall": {"enabled": False},  # on by default: the firewall role's concern
            "vault": {"addr": "https://vault.internal:8200"},
            "secrets": SECRETS,
            "inference": {"runtimes": RUNTIME_INSTALLS, "services": SERVICES},
            "nomad": settings,
        },
        "hosts": {HOST: {"connection": {"address": "192.0.2.10"}}},
    }
    return load(raw, source="test_nomad_jobs").hosts[HOST].config


# --- the structure check: Nomad's api structs, parsed ------------------------------------------


def go_structs(text: str) -> dict[str, dict[str, str]]:
    """type NAME struct { Field Type `tags` } -> {NAME: {Field: Type}}"""
    structs: dict[str, dict[str, str]] = {}
    for m in re.finditer(r"^type (\w+) struct \{\n(.*?)^\}", text, re.M | re.S):
        fields = {}
        for line in m[2].splitlines():
            line = line.split("//")[0].strip()
            if not line or line.startswith("/*"):
                continue
            fm = re.match(r"^(\w+)\s+([\w.*\[\]{}]+)", line)
            assert fm, f"cannot parse field line {line!r} in {m[1]}"
            fields[fm[1]] = fm[2]
        structs[m[1]] = fields
    return structs


STRUCT_DEFS = go_structs(STRUCTS.read_text())
INTS = {"int", "int8", "int64", "uint8", "uint64", "time.Duration"}


def check_value(value: Any, gotype: str, where: str) -> list[str]:
    gotype = gotype.lstrip("*")
    if gotype == "string":
        return [] if isinstance(value, str) else [f"{where}: {value!r} is not a string"]
    if gotype in INTS:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and gotype.startswith("uint") and value < 0:
            ok = False
        return [] if ok else [f"{where}: {value!r} is not an integer ({gotype})"]
    if gotype == "bool":
        return [] if isinstance(value, bool) else [f"{where}: {value!r} is not a bool"]
    if gotype.startswith("[]"):
        if not isinstance(value, list):
            return [f"{where}: {value!r} is not a list"]
        return [p for i, v in enumerate(value) for p in check_value(v, gotype[2:], f"{where}[{i}]")]
    if gotype.startswith("map[string]"):
        if not isinstance(value, dict):
            return [f"{where}: {value!r} is not a map"]
        elem = gotype[len("map[string]") :]
        if elem == "interface{}":
            return []  # driver config: free-form
        return [p for k, v in value.items() for p in check_value(v, elem, f"{where}.{k}")]
    if gotype in STRUCT_DEFS:
        return check_struct(value, gotype, where)
    return [f"{where}: type {gotype} is not in api-structs.go (cannot check)"]


def check_struct(value: Any, name: str, where: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where}: {value!r} is not an object ({name})"]
    fields = STRUCT_DEFS[name]
    problems = []
    for key, item in value.items():
        if key not in fields:
            problems.append(f"{where}.{key}: not a field of Nomad's api.{name}")
            continue
        problems += check_value(item, fields[key], f"{where}.{key}")
    return problems


def test_the_struct_parser_reads_the_fixture() -> None:
    assert STRUCT_DEFS["RequestedDevice"] == {
        "Name": "string",
        "Count": "*uint64",
        "Constraints": "[]*Constraint",
        "Affinities": "[]*Affinity",
    }
    assert STRUCT_DEFS["ServiceCheck"]["Interval"] == "time.Duration"
    assert STRUCT_DEFS["Task"]["Config"] == "map[string]interface{}"
    assert len(STRUCT_DEFS) >= 30


@pytest.mark.parametrize(
    "bad, problem",
    [
        ({"ID": "x", "TaskGroup": []}, "Job.TaskGroup: not a field"),
        ({"ID": 3}, "Job.ID: 3 is not a string"),
        ({"Update": {"HealthyDeadline": "5m"}}, "HealthyDeadline: '5m' is not an integer"),
        ({"Update": {"AutoRevert": "true"}}, "AutoRevert: 'true' is not a bool"),
        (
            {"TaskGroups": [{"Tasks": [{"Resources": {"Devices": [{"Count": -1}]}}]}]},
            "Devices[0].Count: -1 is not an integer (uint64)",
        ),
    ],
)  # fmt: skip
def test_the_structure_check_catches_wrong_fields_and_types(bad: dict, problem: str) -> None:
    problems = check_struct(bad, "Job", "Job")
    assert any(problem in p for p in problems), problems


# --- rendering per runtime ------------------------------------------------------------------------


@pytest.mark.parametrize("service", list(SERVICES))
def test_job_matches_nomads_api_structs(service: str) -> None:
    job = render_job(node_config(), service)
    assert check_struct(job, "Job", "Job") == []
    json.dumps(job)  # plain JSON


# What each service's server is given inside its container, written out by hand.
PROFILE_VALUES: dict[str, dict[str, object]] = {
    "chat": {"model": "/local/model", "listen": ANY, "port": 8000,
             "served_name": "llama-3-70b", "tensor_parallel": 2, "context_length": 8192},
    "small": {"model": "/local/model/smollm2-135m-instruct-q4_1.gguf", "listen": ANY,
              "port": 8080, "served_name": "small", "context_length": 4096, "threads": 8},
    "vision": {"model": "/local/model", "listen": ANY, "port": 9000, "grpc_port": 9001,
               "metrics_port": 9002, "runtime_root": "/opt/tritonserver", "served_name": "vision"},
}  # fmt: skip


@pytest.mark.parametrize("service", list(SERVICES))
def test_command_line_is_the_runtime_profiles(service: str) -> None:
    config = node_config()
    svc = config.inference.services[service]
    (task,) = render_job(config, service)["TaskGroups"][0]["Tasks"]
    profile = PROFILES[svc.runtime]
    assert task["Driver"] == "docker"
    assert task["Config"]["image"] == IMAGES[svc.runtime]
    assert task["Config"]["entrypoint"] == [CONTAINERS[svc.runtime].entrypoint]
    # the same profile (gpunode/runtimes.py) that builds the systemd unit's command line
    assert task["Config"]["args"] == command_line(profile, PROFILE_VALUES[service])
    assert task["Env"] == {k: v.replace("{cache}", "/local/cache") for k, v in profile.env.items()}


def test_vllm_job() -> None:
    job = render_job(node_config(), "chat")
    assert job["ID"] == "gpunode-chat" and job["Type"] == "service"
    assert job["Datacenters"] == ["gpu-dc1"]
    (group,) = job["TaskGroups"]
    assert group["Count"] == 2
    (task,) = group["Tasks"]
    assert task["Config"]["args"] == [
        "serve", "/local/model",
        "--host", ANY, "--port", "8000",
        "--served-model-name", "llama-3-70b",
        "--tensor-parallel-size", "2",
        "--max-model-len", "8192",
    ]  # fmt: skip
    assert task["Resources"]["Devices"] == [
        {
            "Name": "nvidia/gpu",
            "Count": 2,
            "Constraints": [
                {"LTarget": "${device.attr.memory}", "Operand": ">=", "RTarget": "40 GiB"},
                {"LTarget": "${device.model}", "Operand": "=", "RTarget": "NVIDIA H100 80GB HBM3"},
            ],
        }
    ]
    assert task["Artifacts"] == [
        {
            "GetterSource": "https://models.internal/llama-3-70b.tar",
            "GetterOptions": {"checksum": f"sha256:{SHA_TAR}"},
            "GetterMode": "dir",
            "RelativeDest": "local/model/",
        }
    ]
    assert group["Networks"] == [
        {"Mode": "host", "ReservedPorts": [{"Label": "http", "Value": 8000, "To": 8000}]}
    ]


def test_llamacpp_cpu_job_has_no_gpu_and_a_file_artifact() -> None:
    (task,) = render_job(node_config(), "small")["TaskGroups"][0]["Tasks"]
    assert task["Resources"]["Devices"] == []
    assert task["Config"]["args"] == [
        "-m", "/local/model/smollm2-135m-instruct-q4_1.gguf",
        "--host", ANY, "--port", "8080",
        "--alias", "small", "-c", "4096", "-t", "8", "--metrics",
    ]  # fmt: skip
    (artifact,) = task["Artifacts"]
    assert artifact["GetterMode"] == "file"
    assert artifact["RelativeDest"] == "local/model/smollm2-135m-instruct-q4_1.gguf"
    assert artifact["GetterOptions"] == {"checksum": f"sha256:{SHA_MODEL}"}


def test_triton_job_reserves_grpc_and_metrics_ports() -> None:
    job = render_job(node_config(), "vision")
    (group,) = job["TaskGroups"]
    assert group["Networks"][0]["ReservedPorts"] == [
        {"Label": "http", "Value": 9000, "To": 9000},
        {"Label": "grpc", "Value": 9001, "To": 9001},
        {"Label": "metrics", "Value": 9002, "To": 9002},
    ]
    (task,) = group["Tasks"]
    assert task["Config"]["ports"] == ["http", "grpc", "metrics"]
    assert "--backend-directory=/opt/tritonserver/backends" in task["Config"]["args"]
    assert "Vault" not in task and "Templates" not in task  # Triton has no API key
    assert group["Services"][0]["Checks"][0]["Path"] == "/v2/health/ready"


@pytest.mark.parametrize("service, path", [("chat", "/health"), ("small", "/health")])
def test_http_check_on_the_profiles_health_endpoint(service: str, path: str) -> None:
    config = node_config()
    (group,) = render_job(config, service)["TaskGroups"]
    (svc,) = group["Services"]
    assert svc["Provider"] == "nomad" and svc["PortLabel"] == "http"
    (check,) = svc["Checks"]
    assert check == {
        "Name": "ready",
        "Type": "http",
        "Path": path,
        "PortLabel": "http",
        "Interval": 10 * 10**9,
        "Timeout": 3 * 10**9,
        "CheckRestart": {
            "Limit": 3,
            "Grace": config.inference.services[service].health_timeout * 10**9,
            "IgnoreWarnings": False,
        },
    }


def test_update_restart_reschedule_policies() -> None:
    job = render_job(node_config(policy={"canary": 2, "healthy_deadline": "20m"}), "chat")
    assert job["Update"] == {
        "MaxParallel": 1,
        "HealthCheck": "checks",
        "MinHealthyTime": 30 * 10**9,
        "HealthyDeadline": 20 * 60 * 10**9,
        "ProgressDeadline": 30 * 60 * 10**9,
        "Canary": 2,
        "AutoPromote": True,
        "AutoRevert": True,
    }
    (group,) = job["TaskGroups"]
    assert group["RestartPolicy"] == {
        "Attempts": 3,
        "Interval": 30 * 60 * 10**9,
        "Delay": 30 * 10**9,
        "Mode": "fail",
    }
    assert group["ReschedulePolicy"]["DelayFunction"] == "exponential"
    assert group["ReschedulePolicy"]["Unlimited"] is True


@pytest.mark.parametrize(
    "service, path, env, key",
    [
        ("chat", "secret/data/gpunode/chat", "VLLM_API_KEY", "api_key"),
        ("small", "secret/data/gpunode/small?version=3", "LLAMA_API_KEY", "api_key"),
    ],
)
def test_api_key_only_through_a_vault_template(service: str, path: str, env: str, key: str) -> None:
    (task,) = render_job(node_config(), service)["TaskGroups"][0]["Tasks"]
    assert task["Vault"] == {
        "Role": "gpunode-inference",
        "ChangeMode": "restart",
        "Env": False,
        "DisableFile": True,
    }
    (template,) = task["Templates"]
    assert template["Envvars"] is True and template["DestPath"] == "secrets/api-key.env"
    assert template["Perms"] == "0400"
    assert template["EmbeddedTmpl"] == (
        f'{{{{ with secret "{path}" }}}}{env}={{{{ index .Data.data "{key}" | toJSON }}}}'
        "{{ end }}\n"
    )
    # nowhere else in the spec: no env var, no argument carries the key
    assert env not in task["Env"] and not any(env in a for a in task["Config"]["args"])
    assert "VaultToken" not in json.dumps(task)


def test_the_rendered_job_is_stable() -> None:
    # a converged job must render byte-identically run after run (or plan shows a diff)
    a = json.dumps(render_job(node_config(), "chat"), sort_keys=True)
    b = json.dumps(render_job(node_config(), "chat"), sort_keys=True)
    assert a == b


def test_model_change_changes_the_job() -> None:
    before = render_job(node_config(), "small")
    SERVICES["small"]["model"]["sha256"] = "0" * 64
    try:
        after = render_job(node_config(), "small")
    finally:
        SERVICES["small"]["model"]["sha256"] = SHA_MODEL
    artifact = after["TaskGroups"][0]["Tasks"][0]["Artifacts"][0]
    assert artifact["GetterOptions"] == {"checksum": "sha256:" + "0" * 64}
    assert before != after


# --- config errors -------------------------------------------------------------------------


def error(**kwargs: Any) -> str:
    with pytest.raises(ConfigError) as exc:
        node_config(**kwargs)
    return str(exc.value)


def test_unknown_service_is_refused() -> None:
    message = error(jobs={"chatt": {}})
    assert f"host {HOST}: nomad.jobs.chatt: no inference service of that name" in message
    assert "allowed: chat, small, vision" in message


def test_missing_image_is_refused() -> None:
    message = error(images={"vllm": IMAGES["vllm"]}, jobs={"small": {}})
    assert "nomad.jobs.small.image: not set and nomad.images has no llamacpp image" in message


def test_unpinned_image_is_refused() -> None:
    message = error(images={"vllm": "vllm/vllm-openai:latest"}, jobs={"chat": {}})
    assert "'vllm/vllm-openai:latest' is not an image pinned by digest" in message


def test_gpu_constraints_on_a_cpu_service_are_refused() -> None:
    message = error(jobs={"small": {"gpu_memory_min": "8 GiB"}})
    assert (
        "nomad.jobs.small: gpu_memory_min/gpu_model set but inference.services.small.gpus"
        in message
    )


def test_bad_gpu_memory_is_refused() -> None:
    assert "gpu_memory_min" in error(jobs={"chat": {"gpu_memory_min": "40GB"}})


def test_healthy_deadline_must_outlast_the_model_load() -> None:
    message = error(policy={"healthy_deadline": "2m"})
    assert (
        "nomad.policy.healthy_deadline 2m is not longer than "
        "inference.services.chat.health_timeout 180s" in message
    )


def test_jobs_need_nomad_enabled() -> None:
    message = error(enabled=False)
    assert "nomad.jobs: services are listed but nomad.enabled is false" in message


# --- the docs' example is this renderer's output -------------------------------------------

NOMAD_DOC = Path(__file__).parents[2] / "docs" / "nomad.md"


def test_readme_example_job_is_what_the_renderer_makes(tmp_path: Path) -> None:
    section = NOMAD_DOC.read_text()
    yml = re.search(r"```yaml\n(.*?)```", section, re.S)
    shown = re.search(r"```json\n(.*?)```", section, re.S)
    assert yml and shown
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(yml[1])
    out = io.StringIO()
    assert command("render", str(inventory), environ={}, out=out) == 0
    assert out.getvalue() == shown[1]
    assert check_struct(json.loads(shown[1]), "Job", "Job") == []
