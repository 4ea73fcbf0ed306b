"""scripts/record_gpu_fixtures.py: it never fails halfway, and what it records is what the
fake NVML replays.

* Run for real here (pynvml installed, no NVIDIA library, no GPU): every step is recorded
  in the manifest, NVML's real LibraryNotFound error is in nvml.json, the probe exits 2.
* Its recording proxy, wrapped around the fake NVML replaying the H100 recording, records
  the very same calls and results again (the recording format round-trips).
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fake_nvml import FakeNvml, load, recordings

from gpunode import probe

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "record_gpu_fixtures.py"


def from_recorder(name: str) -> Any:
    """A name defined by the recorder script (run as a module, not as the main program)."""
    return runpy.run_path(str(SCRIPT), run_name="record_gpu_fixtures")[name]


def test_recorder_on_a_machine_without_nvml(tmp_path: Path) -> None:
    if probe.pci_nvidia_gpus():
        pytest.skip("this machine has an NVIDIA GPU")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)],
        env={**os.environ, "OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "gpu-fixtures" / "no-gpu"
    assert (
        proc.stdout.strip() == f"gpu fixtures: {folder} ({_seconds(folder)} s; steps failed: none)"
    )
    manifest = json.loads((folder / "manifest.json").read_text())
    steps = manifest["steps"]
    for name in ("nvml", "probe.out", "probe-check.out", "fact.out", "nvidia-smi-q.xml"):
        assert steps[name]["ok"], (name, steps[name])
    assert steps["probe.out"]["rc"] == probe.EXIT_NO_GPU
    assert steps["probe-usage.out"]["rc"] == probe.EXIT_USAGE
    assert steps["host-checks.out"] == {**steps["host-checks.out"], "run": False}
    recording = json.loads((folder / "nvml.json").read_text())
    assert recording["system"]["nvmlInit()"] == {
        "error": "NVMLError_LibraryNotFound",
        "value": 12,
        "message": "NVML Shared Library Not Found",
    }
    assert recording["devices"] == []
    fact = (folder / "fact.out").read_text().splitlines()
    assert fact[-1] == f"gpunode-probe-exit={probe.EXIT_NO_GPU}"
    assert manifest["seconds"] < 60


def _seconds(folder: Path) -> Any:
    return json.loads((folder / "manifest.json").read_text())["seconds"]


@pytest.mark.parametrize("folder", recordings(), ids=lambda p: p.name)
def test_recording_proxy_round_trips_a_real_recording(folder: Path, tmp_path: Path) -> None:
    recording = load(folder)
    recorder = from_recorder("RecordingNvml")(FakeNvml(recording))
    report = probe.collect(recorder, str(tmp_path / "no-sysfs"))
    assert report["gpu_count"] == len(recording["devices"])
    assert recorder.system == {k: recording["system"][k] for k in recorder.system}
    for index, calls in recorder.devices.items():
        original = recording["devices"][index]
        assert calls == {k: _shared_prefix(original[k], v) for k, v in calls.items()}, index
    # the probe's own calls, recorded again, are all there was to record for them
    assert "nvmlDeviceGetMemoryInfo()" in recorder.devices[0]
    assert "nvmlDeviceGetGpuFabricInfo(out)" in recorder.devices[0]


def _shared_prefix(recorded: Any, again: Any) -> Any:
    """``recorded`` with its lists cut to the length of those in ``again``: an output struct
    is filled into this pynvml's own ctypes struct, whose arrays may be shorter (the H100's
    nvidia-ml-py 13.610 has an 80-byte clusterUuid, this one 16)."""
    if isinstance(recorded, dict) and isinstance(again, dict):
        return {k: _shared_prefix(v, again.get(k)) for k, v in recorded.items()}
    if isinstance(recorded, list) and isinstance(again, list):
        return [_shared_prefix(r, a) for r, a in zip(recorded, again, strict=False)]
    return recorded
