"""Inference runtime profiles, as data.

A profile says how one server program is started and checked: the executable for each
install method, its command line (tokens with ``{placeholders}`` filled from a service's
config; a group of tokens is left out when a placeholder it needs is unset), where the
API key comes from, and its health, model-list and metrics endpoints. The role
(roles/inference_systemd.py) and the unit template only read these tables;
gpunode/runtimes.py turns a profile into a command line.

Flags are the servers' own documented ones:

* vLLM: ``vllm serve MODEL --host --port --served-model-name --tensor-parallel-size
  --max-model-len``; the API key from ``$VLLM_API_KEY`` (guards ``/v1/*``; ``/health`` and
  ``/metrics`` stay open).
* llama.cpp ``llama-server``: ``-m --host --port --alias -c -t -ngl --metrics``; the API key
  from ``$LLAMA_API_KEY`` (the env form of ``--api-key``: never on the command line);
  ``/health`` answers 503 while loading, then 200.
* NVIDIA Triton: ``tritonserver --model-repository --http-address --http-port --grpc-address
  --grpc-port --metrics-port``; ready on ``/v2/health/ready``, metrics on their own port. Triton
  has no API key of its own: put it behind an authenticating proxy (config load refuses
  ``api_key_secret`` for it).

.. code:: python

    from gpunode.schema.runtimes import PROFILES
    PROFILES["llamacpp"].health_path   # "/health"
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

InstallMethod = Literal["pip", "package", "artifact"]
RuntimeName = Literal["vllm", "llamacpp", "triton"]  # the keys of PROFILES


@dataclass(frozen=True)
class Arg:
    """Command-line tokens; left out unless every placeholder they name has a value."""

    tokens: tuple[str, ...]


@dataclass(frozen=True)
class Profile:
    name: str
    title: str
    # The server program, per install method: relative to the venv (pip) or to the unpacked
    # artifact (artifact); an absolute path for distro packages (override with `binary:`).
    executable: Mapping[InstallMethod, str]
    args: tuple[Arg, ...]
    health_path: str  # 200 when ready to serve
    models_path: str  # lists the served models
    metrics_path: str  # Prometheus text format
    metrics_port: Literal["api", "own"]  # on the API port, or on its own (metrics_port)
    api_key_env: str | None  # the variable the server reads its API key from; None: none
    gpu_only: bool  # refuses a service without GPUs
    jit: bool  # writes and executes code at run time: no MemoryDenyWriteExecute
    tensor_parallel: bool  # has a tensor-parallel flag
    context_length: bool  # has a context-length flag
    model_format: Literal["file", "tar", "any"]  # the artifact the server loads
    env: Mapping[str, str] = field(default_factory=dict)  # fixed environment ({cache} filled)
    lib_dirs: tuple[str, ...] = ()  # artifact installs: LD_LIBRARY_PATH entries under its root
    # Routes that answer without the API key even when one is set (the server's own docs).
    open_routes: tuple[str, ...] = ()


PROFILES: dict[str, Profile] = {
    "vllm": Profile(
        name="vllm",
        title="vLLM (OpenAI-compatible server)",
        executable={"pip": "bin/vllm", "artifact": "bin/vllm", "package": "/usr/bin/vllm"},
        args=(
            Arg(("serve", "{model}")),
            Arg(("--host", "{listen}", "--port", "{port}")),
            Arg(("--served-model-name", "{served_name}")),
            Arg(("--tensor-parallel-size", "{tensor_parallel}")),
            Arg(("--max-model-len", "{context_length}")),
        ),
        health_path="/health",
        models_path="/v1/models",
        metrics_path="/metrics",
        metrics_port="api",
        api_key_env="VLLM_API_KEY",
        gpu_only=True,
        jit=True,
        tensor_parallel=True,
        context_length=True,
        model_format="any",
        env={
            "HOME": "{cache}",
            "HF_HOME": "{cache}/hf",
            "HF_HUB_OFFLINE": "1",  # the model is local: never reach out to a hub
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        },
        # vLLM's security guide (https://docs.vllm.ai/en/stable/usage/security/): --api-key is
        # checked only under /v1, /v2, /inference and /cohere; these answer without it.
        open_routes=(
            "/invocations",
            "/pooling",
            "/classify",
            "/score",
            "/rerank",
            "/tokenize",
            "/detokenize",
            "/pause",
            "/resume",
            "/abort_requests",
            "/update_weights",
        ),
    ),
    "llamacpp": Profile(
        name="llamacpp",
        title="llama.cpp llama-server (GGUF)",
        executable={
            "artifact": "bin/llama-server",
            "package": "/usr/bin/llama-server",
            "pip": "bin/llama-server",
        },
        args=(
            Arg(("-m", "{model}")),
            Arg(("--host", "{listen}", "--port", "{port}")),
            Arg(("--alias", "{served_name}")),
            Arg(("-c", "{context_length}")),
            Arg(("-t", "{threads}")),
            Arg(("-ngl", "{gpu_layers}")),
            Arg(("--metrics",)),
        ),
        health_path="/health",
        models_path="/v1/models",
        metrics_path="/metrics",
        metrics_port="api",
        api_key_env="LLAMA_API_KEY",
        gpu_only=False,
        jit=False,
        tensor_parallel=False,
        context_length=True,
        model_format="file",
        env={"HOME": "{cache}"},
    ),
    "triton": Profile(
        name="triton",
        title="NVIDIA Triton Inference Server",
        executable={
            "artifact": "bin/tritonserver",
            "package": "/opt/tritonserver/bin/tritonserver",
            "pip": "bin/tritonserver",
        },
        args=(
            Arg(("--model-repository={model}",)),
            Arg(("--http-address={listen}", "--http-port={port}")),
            Arg(("--grpc-address={listen}", "--grpc-port={grpc_port}")),
            Arg(("--metrics-port={metrics_port}",)),
            Arg(("--backend-directory={runtime_root}/backends",)),
            Arg(("--strict-readiness=true", "--exit-on-error=true")),
        ),
        health_path="/v2/health/ready",
        models_path="/v2/models/stats",
        metrics_path="/metrics",
        metrics_port="own",
        api_key_env=None,
        gpu_only=False,
        jit=True,
        tensor_parallel=False,
        context_length=False,
        model_format="tar",
        env={"HOME": "{cache}"},
        lib_dirs=("lib",),
    ),
}

RUNTIME_NAMES = tuple(PROFILES)
assert set(RUNTIME_NAMES) == set(get_args(RuntimeName)), "RuntimeName and PROFILES differ"
