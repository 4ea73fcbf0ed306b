"""Nomad job specs for inference services, rendered from the same config as the units.

One service in ``inference.services`` (gpunode/inference.py: runtime, model URI and
sha256, port, GPUs, context length, API key secret...) and its runtime profile
(gpunode/runtimes.py: command line, health and metrics endpoints) are the single source
of truth; ``nomad.jobs.<name>`` adds only what Nomad needs besides (replicas, reserved
CPU/RAM/disk, GPU constraints, container image). A service listed in ``nomad.jobs`` runs
as a Nomad job instead of a systemd unit.

The job is JSON for Nomad's HTTP API (``POST /v1/jobs``): Go field names, durations as
integer nanoseconds. Per service: one group, one docker task (isolation comes from the
docker driver and the NVIDIA container toolkit; ``nomad-device-nvidia`` only sets
``NVIDIA_VISIBLE_DEVICES``) with

- ``Resources.Devices``: ``nvidia/gpu`` x the service's GPU count, constrained by GPU
  memory and model;
- the model as an ``artifact`` checked by ``sha256`` (go-getter ``checksum`` option);
- the API key (if any) through a ``template`` that reads Vault with the task's workload
  identity (task ``Vault.Role``) into an env file: never a secret in the spec;
- an HTTP health check on the runtime's health endpoint (Nomad service discovery) with
  ``check_restart``; an ``update`` block with canary, auto-promote and auto-revert;
  ``restart`` and ``reschedule`` policies.

.. code:: python

    from gpunode.nomad_jobs import render_job
    job = render_job(config, "chat")      # a dict: json.dumps(job) is the API payload
"""

from __future__ import annotations

import posixpath
import urllib.parse
from dataclasses import dataclass
from typing import Any

from gpunode.runtimes import command_line
from gpunode.schema.inference import ModelSpec, Service
from gpunode.schema.node import NodeConfig
from gpunode.schema.nomad import NomadJob
from gpunode.schema.runtimes import PROFILES
from gpunode.schema.types import parse_duration_ns


@dataclass(frozen=True)
class Container:
    """How a runtime's official container image runs its server (the profile's command
    line is the same as the systemd unit's; only the program path and root differ)."""

    entrypoint: str  # the server program inside the image
    root: str  # the runtime's install root inside the image ({runtime_root})


CONTAINERS: dict[str, Container] = {
    # vllm/vllm-openai: the `vllm` console script of the image's Python
    "vllm": Container(entrypoint="vllm", root="/usr/local"),
    # ghcr.io/ggml-org/llama.cpp:server-cuda: /app/llama-server
    "llamacpp": Container(entrypoint="/app/llama-server", root="/app"),
    # nvcr.io/nvidia/tritonserver:<yy.mm>-py3
    "triton": Container(entrypoint="/opt/tritonserver/bin/tritonserver", root="/opt/tritonserver"),
}

TASK = "server"
MODEL_DIR = "local/model"  # in the task dir; the docker driver mounts local/ at /local
CACHE = "/local/cache"
SECRETS_ENV = "secrets/api-key.env"  # secrets/ is the task's tmpfs, not in the image
KILL_TIMEOUT = "30s"  # let the server drain requests and free GPU memory


def job_id(service: str) -> str:
    return f"gpunode-{service}"


def nomad_services(config: NodeConfig) -> list[str]:
    """Names of the inference services this node runs as Nomad jobs."""
    return list(config.nomad.jobs)


def model_file(spec: ModelSpec) -> str:
    """Where the model is inside the container (artifact destination, relative to /)."""
    if spec.format == "tar":
        base = f"/{MODEL_DIR}"
        return posixpath.join(base, spec.subpath) if spec.subpath else base
    name = posixpath.basename(urllib.parse.urlsplit(spec.uri).path) or "model"
    return f"/{MODEL_DIR}/{name}"


def _ns(value: str) -> int:
    return parse_duration_ns(value)


def render_job(config: NodeConfig, name: str) -> dict[str, Any]:
    """The Nomad job (API JSON) for inference service ``name`` on this node's config."""
    svc = config.inference.services[name]
    settings = config.nomad.jobs.get(name) or NomadJob()
    profile = PROFILES[svc.runtime]
    container = CONTAINERS[svc.runtime]
    nomad = config.nomad
    policy = nomad.policy

    ports = [{"Label": "http", "Value": svc.port, "To": svc.port}]
    grpc = svc.effective_grpc_port()
    if grpc is not None:
        ports.append({"Label": "grpc", "Value": grpc, "To": grpc})
    metrics_port = svc.effective_metrics_port()
    if profile.metrics_port == "own":
        ports.append({"Label": "metrics", "Value": metrics_port, "To": metrics_port})

    values: dict[str, object] = {
        "model": model_file(svc.model),
        "listen": "0.0.0.0",  # noqa: S104 - inside the container; the host port is the reserved one
        "port": svc.port,
        "served_name": svc.model.served_name or name,
        "tensor_parallel": svc.tensor_parallel if profile.tensor_parallel else None,
        "context_length": svc.context_length,
        "threads": svc.threads,
        "gpu_layers": 999 if svc.gpus else None,
        "grpc_port": grpc,
        "metrics_port": metrics_port if profile.metrics_port == "own" else None,
        "runtime_root": container.root,
    }
    task: dict[str, Any] = {
        "Name": TASK,
        "Driver": "docker",
        "Config": {
            "image": settings.image or nomad.images[svc.runtime],
            "entrypoint": [container.entrypoint],
            "args": command_line(profile, values) + list(svc.extra_args),
            "ports": [p["Label"] for p in ports],
        },
        "Env": {k: v.replace("{cache}", CACHE) for k, v in sorted(profile.env.items())},
        "Resources": {
            "CPU": settings.cpu,
            "MemoryMB": settings.memory_mb,
            "Devices": _devices(svc, settings),
        },
        "Artifacts": [_artifact(svc.model)],
        "KillTimeout": _ns(KILL_TIMEOUT),
        "LogConfig": {"MaxFiles": 10, "MaxFileSizeMB": 20},
    }
    if svc.api_key_secret is not None:
        task["Vault"] = {
            "Role": nomad.vault_role,
            "ChangeMode": "restart",
            "Env": False,  # the server gets the key, not a Vault token
            "DisableFile": True,
        }
        task["Templates"] = [_secret_template(config, svc)]

    group: dict[str, Any] = {
        "Name": name,
        "Count": settings.count,
        "Constraints": [{"LTarget": "${attr.kernel.name}", "Operand": "=", "RTarget": "linux"}],
        "Networks": [{"Mode": "host", "ReservedPorts": ports}],
        "Services": [
            {
                "Name": job_id(name),
                "Provider": "nomad",
                "PortLabel": "http",
                "Tags": [svc.runtime, f"model-sha256-{svc.model.sha256[:12]}"],
                "Meta": {"metrics_path": profile.metrics_path, "metrics_port": str(metrics_port)},
                "Checks": [
                    {
                        "Name": "ready",
                        "Type": "http",
                        "Path": profile.health_path,
                        "PortLabel": "http",
                        "Interval": _ns(policy.check_interval),
                        "Timeout": _ns(policy.check_timeout),
                        "CheckRestart": {
                            "Limit": 3,
                            "Grace": svc.health_timeout * 10**9,  # the model loads first
                            "IgnoreWarnings": False,
                        },
                    }
                ],
            }
        ],
        "RestartPolicy": {
            "Attempts": policy.restart_attempts,
            "Interval": _ns(policy.restart_interval),
            "Delay": _ns(policy.restart_delay),
            "Mode": "fail",  # then the reschedule policy moves it to another node
        },
        "ReschedulePolicy": {
            "Delay": _ns(policy.reschedule_delay),
            "DelayFunction": "exponential",
            "MaxDelay": _ns(policy.reschedule_max_delay),
            "Unlimited": True,
        },
        "EphemeralDisk": {"SizeMB": settings.disk_mb, "Sticky": True, "Migrate": False},
        "Tasks": [task],
    }
    return {
        "ID": job_id(name),
        "Name": job_id(name),
        "Type": "service",
        "Region": nomad.region,
        "Namespace": nomad.namespace,
        "Datacenters": [nomad.datacenter],
        "Priority": 50,
        "Meta": {
            "gpunode_service": name,
            "gpunode_runtime": svc.runtime,
            "gpunode_model_sha256": svc.model.sha256,
        },
        "Update": {
            "MaxParallel": 1,
            "HealthCheck": "checks",
            "MinHealthyTime": _ns(policy.min_healthy_time),
            "HealthyDeadline": _ns(policy.healthy_deadline),
            "ProgressDeadline": _ns(policy.progress_deadline),
            "Canary": policy.canary,
            "AutoPromote": policy.auto_promote and policy.canary > 0,
            "AutoRevert": policy.auto_revert,
        },
        "TaskGroups": [group],
    }


def _devices(svc: Service, settings: NomadJob) -> list[dict[str, Any]]:
    if not svc.gpus:
        return []
    constraints = []
    if settings.gpu_memory_min:
        constraints.append(
            {
                "LTarget": "${device.attr.memory}",
                "Operand": ">=",
                "RTarget": settings.gpu_memory_min,
            }
        )
    if settings.gpu_model:
        constraints.append(
            {"LTarget": "${device.model}", "Operand": "=", "RTarget": settings.gpu_model}
        )
    device: dict[str, Any] = {"Name": "nvidia/gpu", "Count": len(svc.gpus)}
    if constraints:
        device["Constraints"] = constraints
    return [device]


def _artifact(spec: ModelSpec) -> dict[str, Any]:
    artifact: dict[str, Any] = {
        "GetterSource": spec.uri,
        "GetterOptions": {"checksum": f"sha256:{spec.sha256}"},
    }
    if spec.format == "tar":
        artifact.update(GetterMode="dir", RelativeDest=f"{MODEL_DIR}/")  # unpacked by go-getter
    else:
        artifact.update(GetterMode="file", RelativeDest=model_file(spec).lstrip("/"))
    return artifact


def _secret_template(config: NodeConfig, svc: Service) -> dict[str, Any]:
    """The API key from Vault KV v2 into an env file, by the task's workload identity."""
    assert svc.api_key_secret is not None
    secret = config.secrets[svc.api_key_secret]
    profile = PROFILES[svc.runtime]
    path = f"{secret.mount}/data/{secret.path}"
    if secret.version is not None:
        path += f"?version={secret.version}"
    body = (
        f'{{{{ with secret "{path}" }}}}'
        f'{profile.api_key_env}={{{{ index .Data.data "{secret.key}" | toJSON }}}}'
        "{{ end }}\n"
    )
    return {
        "DestPath": SECRETS_ENV,
        "EmbeddedTmpl": body,
        "Envvars": True,
        "ChangeMode": "restart",
        "Perms": "0400",
        "ErrMissingKey": True,
    }


def check_jobs(where: str, config: NodeConfig) -> list[str]:
    """Config-load checks of ``nomad.jobs`` against the services they name."""
    problems: list[str] = []
    services = config.inference.services
    for name, settings in config.nomad.jobs.items():
        at = f"{where}: nomad.jobs.{name}"
        svc = services.get(name)
        if svc is None:
            problems.append(
                f"{at}: no inference service of that name (allowed: "
                f"{', '.join(services) or 'none defined under inference.services'})"
            )
            continue
        if svc.runtime not in CONTAINERS:
            problems.append(
                f"{at}: runtime {svc.runtime} has no container (allowed: {', '.join(CONTAINERS)})"
            )
        if settings.image is None and svc.runtime not in config.nomad.images:
            problems.append(
                f"{at}.image: not set and nomad.images has no {svc.runtime} image (allowed: "
                f"set nomad.images.{svc.runtime}, e.g. an image pinned by @sha256:<digest>)"
            )
        if not svc.model.uri.startswith(("http://", "https://")):
            problems.append(
                f"{at}: inference.services.{name}.model.uri: {svc.model.uri} is not fetched by "
                "Nomad's artifact block (allowed: an http(s):// URI of a mirror)"
            )
        if not svc.gpus and (settings.gpu_memory_min or settings.gpu_model):
            problems.append(
                f"{at}: gpu_memory_min/gpu_model set but inference.services.{name}.gpus is empty "
                "(allowed: unset them, or give the service GPUs)"
            )
        deadline = parse_duration_ns(config.nomad.policy.healthy_deadline)
        if deadline <= svc.health_timeout * 10**9:
            problems.append(
                f"{at}: nomad.policy.healthy_deadline {config.nomad.policy.healthy_deadline} is "
                f"not longer than inference.services.{name}.health_timeout {svc.health_timeout}s "
                "(allowed: a longer deadline, or a shorter health_timeout)"
            )
        if svc.api_key_secret is not None and svc.api_key_secret in config.secrets:
            sec = config.secrets[svc.api_key_secret]
            if sec.mount != config.nomad.vault_kv_mount:
                problems.append(
                    f"{at}: secrets.{svc.api_key_secret}.mount {sec.mount} is not "
                    f"nomad.vault_kv_mount {config.nomad.vault_kv_mount} (allowed: the KV mount "
                    "the Nomad workload role may read)"
                )
    return problems
