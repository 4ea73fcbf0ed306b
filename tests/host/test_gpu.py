"""GPU checks: driver, GPUs as declared, health, fabric manager, the probe's gate.

They run on hosts that declare GPUs and skip only on hosts declared GPU-less
(``gpu.required`` false, ``gpu.count`` unset or 0, no ``gpu.model``; see
gpunode/gpus.py). The probe is ``/usr/local/sbin/gpunode-probe`` (roles/gpu_probe.py);
GPUNODE_PROBE overrides the command, for scripts/record_gpu_fixtures.py, which runs
these checks on a GPU machine where the probe is not installed.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from gpunode import probe
from gpunode.schema.gpu import GPU_MODELS
from gpunode.schema.node import Host

PROBE = os.environ.get("GPUNODE_PROBE", probe.PROBE_PATH)


@pytest.fixture(scope="module", autouse=True)
def gpu_host(node: Host) -> Host:
    if not node.config.gpu.declares_gpu:
        pytest.skip("host declared GPU-less (gpu.required false, no gpu.count, no gpu.model)")
    return node


@pytest.fixture(scope="module")
def report(host) -> dict[str, Any]:
    out = host.run(PROBE)
    try:
        data: dict[str, Any] = json.loads(out.stdout)
    except ValueError:
        pytest.fail(f"{PROBE} printed no JSON (exit {out.rc}): {out.stdout!r} {out.stderr!r}")
    assert data["exit_code"] == out.rc
    assert data["status"] not in ("no_gpu", "nvml_error"), data["error"]
    return data


def test_driver_loaded_at_pinned_version(host, node: Host) -> None:
    version_file = host.file("/sys/module/nvidia/version")
    assert version_file.exists, "the nvidia kernel module is not loaded"
    loaded = version_file.content_string.strip()
    nvidia = node.config.nvidia
    if nvidia.version:
        assert loaded == nvidia.version
    else:
        assert loaded.startswith(nvidia.branch + "."), (loaded, nvidia.branch)


def test_nvml_sees_the_loaded_driver(host, report: dict[str, Any]) -> None:
    loaded = host.file("/sys/module/nvidia/version").content_string.strip()
    assert report["driver_version"] == loaded


def test_gpu_count_as_declared(node: Host, report: dict[str, Any]) -> None:
    declared = node.config.gpu.count
    if declared is None:
        assert report["gpu_count"] >= 1
    else:
        assert report["gpu_count"] == declared


def test_gpu_model_as_declared(node: Host, report: dict[str, Any]) -> None:
    if node.config.gpu.model is None:
        pytest.skip("no gpu.model declared")
    names = GPU_MODELS[node.config.gpu.model].nvml_names
    assert [g["name"] for g in report["gpus"] if g["name"] not in names] == []


def test_persistence_mode_on(report: dict[str, Any]) -> None:
    assert [g["index"] for g in report["gpus"] if g.get("persistence_mode") is not True] == []


def test_no_pending_retired_pages_or_row_remaps(report: dict[str, Any]) -> None:
    pending = [
        g["index"]
        for g in report["gpus"]
        if g.get("retired_pages_pending") or (g.get("remapped_rows") or {}).get("pending")
    ]
    assert pending == []


def test_fabric_manager_active_where_required(host, node: Host, report: dict[str, Any]) -> None:
    wanted = node.config.gpu.fabric_manager
    if wanted is None:  # required where the GPUs sit on NVSwitches
        nvswitches = host.run("ls /proc/driver/nvidia-nvswitch/devices 2>/dev/null").stdout.split()
        on_fabric = [
            g["index"]
            for g in report["gpus"]
            if (g.get("fabric") or {}).get("state") not in (None, "not_supported")
        ]
        wanted = bool(nvswitches or on_fabric)
    if not wanted:
        pytest.skip("no NVSwitch on this node: nvidia-fabricmanager not required")
    assert host.service("nvidia-fabricmanager").is_running
    states = {g["index"]: (g.get("fabric") or {}).get("state") for g in report["gpus"]}
    assert set(states.values()) == {"completed"}, states


def test_probe_check_passes(host, node: Host) -> None:
    gate = f"{PROBE} --check --min-gpus {node.config.gpu.count or 1}"
    out = host.run(gate)
    assert out.rc == probe.EXIT_HEALTHY, (gate, out.rc, out.stderr)
