"""tests/host/test_gpu.py skips only on hosts declared GPU-less.

Run with testinfra's local backend on this machine (no NVIDIA GPU, no driver): declared
GPU-less, every GPU check skips; declared with a GPU (by required, count or model), they run
and fail, because the host has no GPU. On a real H100 they passed (6 passed, 2 skipped: no
gpu.model declared, no NVSwitch), see tests/unit/fixtures/gpu/*/host-checks.out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fake_nvml import recordings

from gpunode import probe

REPO = Path(__file__).resolve().parents[2]


def host_checks(tmp_path: Path, gpu: dict[str, Any]) -> dict[str, str]:
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(
        json.dumps(
            {
                # any known distro: the checks read none; nor the firewall (on by default)
                "defaults": {"distro": "debian12", "firewall": {"enabled": False}},
                "hosts": {"here": {"connection": {"address": "127.0.0.1"}, "data": {"gpu": gpu}}},
            }
        )
    )
    env = {
        **os.environ,
        "GPUNODE_INVENTORY": str(inventory),
        "GPUNODE_HOST": "here",
        "GPUNODE_PROBE": f"{sys.executable} {REPO / 'gpunode' / 'probe.py'}",
    }
    junit = tmp_path / "junit.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--hosts=local://",
         f"--junitxml={junit}", "tests/host/test_gpu.py"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    import xml.etree.ElementTree as ET  # noqa: S405 - our own pytest's JUnit output

    outcomes = {}
    for case in ET.parse(junit).getroot().iter("testcase"):  # noqa: S314
        tags = {child.tag for child in case}
        outcome = next((t for t in ("error", "failure", "skipped") if t in tags), "passed")
        outcomes[case.get("name", "").split("[")[0]] = outcome
    return outcomes


def test_gpu_less_host_skips_every_check(tmp_path: Path) -> None:
    outcomes = host_checks(tmp_path, {"required": False})
    assert len(outcomes) == 8
    assert set(outcomes.values()) == {"skipped"}, outcomes


@pytest.mark.parametrize("gpu", [{"required": True}, {"count": 1}, {"model": "H100-SXM-80GB"}])
def test_host_declared_with_a_gpu_fails_without_one(tmp_path: Path, gpu: dict[str, Any]) -> None:
    if probe.pci_nvidia_gpus():
        pytest.skip("this machine has an NVIDIA GPU")
    outcomes = host_checks(tmp_path, gpu)
    assert outcomes["test_driver_loaded_at_pinned_version"] == "failure"
    assert outcomes["test_probe_check_passes"] == "failure"
    # the probe's report says no_gpu: every check that reads it errors in its fixture
    for name in ("test_gpu_count_as_declared", "test_persistence_mode_on"):
        assert outcomes[name] == "error", name
    assert "passed" not in outcomes.values()


@pytest.mark.parametrize("folder", recordings(), ids=lambda p: p.name)
def test_recorded_host_checks_passed_on_the_gpu(folder: Path) -> None:
    text = (folder / "host-checks.out").read_text()
    assert "tests/host/test_gpu.py::test_probe_check_passes[local]" in text
    assert "PASSED tests/host/test_gpu.py::test_probe_check_passes[local]" in text
    assert " failed" not in text and "FAILED" not in text
