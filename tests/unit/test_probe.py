"""gpunode-probe (gpunode/probe.py) against NVML: real where it runs here, else replayed.

* No NVML library (this machine and CI: pynvml installed, no libnvidia-ml.so.1): the REAL
  pynvml, so the "no GPU" path is the one a GPU-less node takes.
* A GPU machine: ``FakeNvml`` (tests/unit/fake_nvml.py) replays every NVML call the probe
  makes from what scripts/record_gpu_fixtures.py recorded on real GPUs
  (tests/unit/fixtures/gpu/<gpu>/nvml.json). The replayed report must equal the report the
  probe produced during that recording.
* Degraded cases are derived from a healthy recording by changing ONE recorded reading
  (or making one call raise an NVML error code from nvml.h); everything else stays as the
  real GPU answered. A reading that the GPU does not support (recorded NotSupported) cannot
  be derived and is skipped with that reason.
* Error paths that need NVML to fail at init (driver not loaded, version mismatch) raise the
  real pynvml error classes for the NVML return codes of nvml.h.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pynvml
import pytest
from fake_nvml import FakeNvml, load, recordings, sysfs_tree, with_error, with_reading

from gpunode import probe

RECORDINGS = recordings()
# PCI IDs: NVIDIA's vendor ID and the PCI-SIG class code of a 3D controller (what data
# centre GPUs report); used where no recording supplies a real sysfs tree.
NVIDIA_3D_CONTROLLER = {"vendor": "0x10de", "class": "0x030200"}


@pytest.fixture
def empty_sysfs(tmp_path: Path) -> str:
    return str(sysfs_tree(tmp_path / "devices", {}))


@pytest.fixture
def gpu_sysfs(tmp_path: Path) -> str:
    return str(sysfs_tree(tmp_path / "gpu-devices", {"0000:01:00.0": NVIDIA_3D_CONTROLLER}))


def failing_init(code: int) -> FakeNvml:
    error = pynvml.NVMLError(code)
    return FakeNvml(
        {
            "system": {"nvmlInit()": {"error": type(error).__name__, "value": code, "message": ""}},
            "devices": [],
        }
    )


# --- no GPU / NVML errors -----------------------------------------------------------------


def test_no_nvml_library_and_no_pci_gpu_is_no_gpu(empty_sysfs: str) -> None:
    report = probe.collect(pynvml, empty_sysfs)  # the real pynvml: no libnvidia-ml.so.1 here
    assert report["status"] == "no_gpu"
    assert report["exit_code"] == probe.EXIT_NO_GPU == 2
    assert report["error"] == "nvmlInit: NVMLError_LibraryNotFound: NVML Shared Library Not Found"
    assert (report["gpu_count"], report["gpus"], report["pci_gpus"]) == (0, [], [])


def test_no_nvml_library_with_a_gpu_on_pci_is_an_nvml_error(gpu_sysfs: str) -> None:
    report = probe.collect(pynvml, gpu_sysfs)
    assert report["exit_code"] == probe.EXIT_NVML_ERROR == 3
    assert report["status"] == "nvml_error"
    assert report["pci_gpus"] == ["0000:01:00.0"]
    assert report["error"].endswith("(but 1 NVIDIA GPU(s) on the PCI bus)")


def test_driver_not_loaded(empty_sysfs: str, gpu_sysfs: str) -> None:
    nvml = failing_init(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    assert probe.collect(nvml, empty_sysfs)["exit_code"] == probe.EXIT_NO_GPU
    with_gpu = probe.collect(nvml, gpu_sysfs)
    assert with_gpu["exit_code"] == probe.EXIT_NVML_ERROR
    assert "NVMLError_DriverNotLoaded" in with_gpu["error"]


def test_other_init_errors_are_nvml_errors_even_without_pci_gpus(empty_sysfs: str) -> None:
    for code in (pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH, pynvml.NVML_ERROR_NO_PERMISSION):
        report = probe.collect(failing_init(code), empty_sysfs)
        assert report["exit_code"] == probe.EXIT_NVML_ERROR, code


def test_unreadable_pci_bus_is_none_not_an_empty_list(tmp_path: Path) -> None:
    assert probe.pci_nvidia_gpus(str(tmp_path / "absent")) is None


def test_pci_listing_keeps_display_controllers_only(tmp_path: Path) -> None:
    sysfs = sysfs_tree(
        tmp_path / "devices",
        {
            "0000:01:00.0": NVIDIA_3D_CONTROLLER,
            "0000:02:00.0": {"vendor": "0x10de", "class": "0x068000"},  # a bridge (NVSwitch)
            "0000:03:00.0": {"vendor": "0x8086", "class": "0x030000"},  # another vendor's VGA
        },
    )
    assert probe.pci_nvidia_gpus(str(sysfs)) == ["0000:01:00.0"]


def test_missing_pynvml_exits_3_with_json(monkeypatch, capsys) -> None:
    def no_pynvml() -> Any:
        raise ImportError("No module named 'pynvml'")

    monkeypatch.setattr(probe, "import_nvml", no_pynvml)
    assert probe.main([]) == probe.EXIT_NVML_ERROR
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "nvml_error" and "pynvml cannot be imported" in report["error"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--min-gpus", "x"],
        ["--min-gpus", "1"],
        ["--min-free-mib", "0"],
        ["--check", "--min-free-mib", "-1"],
        ["--verbose"],
    ],
)
def test_usage_errors_exit_64_not_2(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        probe.main(argv)
    assert exc.value.code == probe.EXIT_USAGE == 64
    assert "usage: gpunode-probe" in capsys.readouterr().err


def test_exit_codes_are_documented_in_the_module_docstring() -> None:
    doc = probe.__doc__ or ""
    for code, status in probe.STATUS.items():
        assert f"\n    {code}   " in doc, code
        assert status in doc or status.replace("_", " ") in doc, status
    assert "\n    64  usage" in doc


# --- replaying real GPUs ------------------------------------------------------------------


def replay(recording: dict[str, Any], tmp_path: Path) -> Any:
    sysfs = sysfs_tree(tmp_path / "replay-devices", recording["sysfs_pci_nvidia"] or {})
    return probe.collect(FakeNvml(recording), str(sysfs))


@pytest.fixture(params=RECORDINGS, ids=lambda p: p.name)
def recorded(request: pytest.FixtureRequest) -> tuple[Path, dict[str, Any]]:
    return request.param, load(request.param)


@pytest.fixture
def healthy(recorded: tuple[Path, dict[str, Any]]) -> dict[str, Any]:
    folder, recording = recorded
    report = json.loads((folder / "probe-inprocess.json").read_text())
    if report["status"] != "healthy":
        pytest.skip(f"{folder.name} was recorded {report['status']}: no healthy baseline")
    return recording


def test_replay_gives_the_recorded_report(
    recorded: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    folder, recording = recorded
    expected = json.loads((folder / "probe-inprocess.json").read_text())
    assert replay(recording, tmp_path) == expected


def test_recorded_report_shape(recorded: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    _, recording = recorded
    report = replay(recording, tmp_path)
    assert set(report) == set(probe.empty_report())
    assert report["gpu_count"] == len(report["gpus"]) == len(recording["devices"]) >= 1
    assert report["driver_version"] and report["cuda_version"]
    for gpu in report["gpus"]:
        assert gpu["uuid"].startswith("GPU-")
        assert gpu["memory"]["total"] == gpu["memory"]["used"] + gpu["memory"]["free"]
        assert gpu["memory"]["total"] > 8 * 2**30


def test_recorded_probe_runs(recorded: tuple[Path, dict[str, Any]]) -> None:
    """The probe run as a program on the GPU machine: exit codes and JSON as documented."""
    folder, _ = recorded
    steps = json.loads((folder / "manifest.json").read_text())["steps"]
    plain = json.loads((folder / "probe.out").read_text())
    assert steps["probe.out"]["rc"] == plain["exit_code"]
    assert set(plain) == set(probe.empty_report())
    check = json.loads((folder / "probe-check.out").read_text())
    assert steps["probe-check.out"]["rc"] == check["exit_code"]
    assert check["check"]["min_gpus"] == 1
    too_many = json.loads((folder / "probe-check-min-gpus.out").read_text())
    too_big = json.loads((folder / "probe-check-min-free.out").read_text())
    if plain["status"] == "healthy":
        assert steps["probe-check.out"]["rc"] == probe.EXIT_HEALTHY
        assert steps["probe-check-min-gpus.out"]["rc"] == probe.EXIT_CHECK_FAILED
        assert steps["probe-check-min-free.out"]["rc"] == probe.EXIT_CHECK_FAILED
        assert too_many["check"]["problems"] and too_big["check"]["problems"]
    assert steps["probe-usage.out"]["rc"] == probe.EXIT_USAGE


def _derive(recording: dict[str, Any], key: str, change: Any) -> dict[str, Any]:
    """ONE recorded reading of GPU 0 changed by ``change(recorded_result)``."""
    outcome = recording["devices"][0].get(key)
    if outcome is None or "error" in outcome:
        pytest.skip(f"{key} on this GPU: {outcome and outcome['error']} (nothing to change)")
    return with_reading(recording, 0, key, change(outcome["result"]))


def _problems(recording: dict[str, Any], tmp_path: Path) -> tuple[int, list[str]]:
    report = replay(recording, tmp_path)
    return report["exit_code"], report["problems"]


def test_healthy_recording_is_healthy(healthy: dict[str, Any], tmp_path: Path) -> None:
    assert _problems(healthy, tmp_path) == (probe.EXIT_HEALTHY, [])


def test_retired_pages_pending_is_degraded(healthy: dict[str, Any], tmp_path: Path) -> None:
    changed = _derive(healthy, "nvmlDeviceGetRetiredPagesPendingStatus()", lambda _: 1)
    code, problems = _problems(changed, tmp_path)
    assert code == probe.EXIT_DEGRADED
    assert problems == [f"gpu 0 ({_uuid(healthy)}): retired pages pending: reset or reboot the GPU"]


def test_health_rules_on_the_recorded_report(recorded: tuple[Path, dict[str, Any]]) -> None:
    """The rules themselves, on the recorded report with ONE field changed each: this covers
    readings the recorded GPU does not support (H100: retired pages, recorded NotSupported)."""
    folder, _ = recorded
    gpu = json.loads((folder / "probe-inprocess.json").read_text())["gpus"][0]
    assert probe.gpu_problems(gpu) == []
    prefix = f"gpu 0 ({gpu['uuid']}): "
    changes: list[tuple[str, Any, str]] = [
        ("retired_pages_pending", True, "retired pages pending: reset or reboot the GPU"),
        ("ecc", {**gpu["ecc"], "volatile_uncorrected": 1}, "1 uncorrected ECC errors since"),
        ("fabric", {"state": "in_progress", "status": 0}, "NVLink fabric in_progress"),
        ("fabric", {"state": "completed", "status": 3}, "NVLink fabric registration failed"),
    ]
    for field, value, message in changes:
        problems = probe.gpu_problems({**gpu, field: value})
        assert len(problems) == 1 and problems[0].startswith(prefix + message), (field, problems)
    assert probe.gpu_problems({**gpu, "fabric": {"state": "completed", "status": 0}}) == []


def _uuid(recording: dict[str, Any]) -> str:
    return str(recording["devices"][0]["nvmlDeviceGetUUID()"]["result"])


def _remapped(index: int, value: int) -> Any:
    def change(result: dict[str, Any]) -> dict[str, Any]:
        fields = list(result["__tuple__"])
        fields[index] = value
        return {"__tuple__": fields}

    return change


@pytest.mark.parametrize(
    ("index", "message"),
    [
        (2, "row remapping pending: reset the GPU"),
        (3, "row remapping failed: the GPU needs service"),
    ],
)
def test_row_remapping_pending_or_failed_is_degraded(
    healthy: dict[str, Any], tmp_path: Path, index: int, message: str
) -> None:
    changed = _derive(healthy, "nvmlDeviceGetRemappedRows()", _remapped(index, 1))
    assert _problems(changed, tmp_path) == (
        probe.EXIT_DEGRADED,
        [f"gpu 0 ({_uuid(healthy)}): {message}"],
    )


def test_uncorrected_ecc_errors_are_degraded(healthy: dict[str, Any], tmp_path: Path) -> None:
    mode = healthy["devices"][0].get("nvmlDeviceGetEccMode()", {}).get("result")
    if not mode or not mode[0]:
        pytest.skip("ECC is off or not supported on the recorded GPU")
    changed = _derive(healthy, "nvmlDeviceGetTotalEccErrors(1, 0)", lambda _: 2)
    assert _problems(changed, tmp_path) == (
        probe.EXIT_DEGRADED,
        [f"gpu 0 ({_uuid(healthy)}): 2 uncorrected ECC errors since the last reset"],
    )


def test_temperature_at_slowdown_is_degraded(healthy: dict[str, Any], tmp_path: Path) -> None:
    threshold = healthy["devices"][0].get("nvmlDeviceGetTemperatureThreshold(1)", {})
    if "result" not in threshold:
        pytest.skip("no slowdown threshold recorded")
    slowdown = threshold["result"]
    changed = _derive(healthy, "nvmlDeviceGetTemperature(0)", lambda _: slowdown)
    assert _problems(changed, tmp_path) == (
        probe.EXIT_DEGRADED,
        [f"gpu 0 ({_uuid(healthy)}): temperature {slowdown} C at or above slowdown {slowdown} C"],
    )


def test_fabric_not_started_is_degraded(healthy: dict[str, Any], tmp_path: Path) -> None:
    key = "nvmlDeviceGetGpuFabricInfo(out)"
    outcome = healthy["devices"][0].get(key)
    if outcome is None or "error" in outcome:
        pytest.skip(f"no NVLink fabric on the recorded GPU ({outcome and outcome['error']})")
    changed = json.loads(json.dumps(healthy))
    changed["devices"][0][key]["out"][0]["fields"]["state"] = 1  # NVML_GPU_FABRIC_STATE_NOT_STARTED
    code, problems = _problems(changed, tmp_path)
    assert code == probe.EXIT_DEGRADED
    assert problems == [
        f"gpu 0 ({_uuid(healthy)}): NVLink fabric not_started: is nvidia-fabricmanager running?"
    ]


def test_lost_gpu_is_degraded(healthy: dict[str, Any], tmp_path: Path) -> None:
    lost = with_error(healthy, 0, "nvmlDeviceGetMemoryInfo()", pynvml.NVML_ERROR_GPU_IS_LOST)
    report = replay(lost, tmp_path)
    assert report["exit_code"] == probe.EXIT_DEGRADED
    assert report["gpus"][0] == {
        "index": 0,
        "error": "NVMLError_GpuIsLost: GPU is lost",
        "problems": ["gpu 0: NVML cannot read it (NVMLError_GpuIsLost: GPU is lost)"],
    }


def test_zero_devices(healthy: dict[str, Any], tmp_path: Path, empty_sysfs: str) -> None:
    none = with_reading(healthy, None, "nvmlDeviceGetCount()", 0)
    no_gpu = probe.collect(FakeNvml(none), empty_sysfs)
    assert (no_gpu["exit_code"], no_gpu["gpu_count"]) == (probe.EXIT_NO_GPU, 0)
    if healthy["sysfs_pci_nvidia"]:  # the GPUs still on the PCI bus: NVML lost them all
        report = replay(none, tmp_path)
        assert report["exit_code"] == probe.EXIT_NVML_ERROR
        assert report["error"].startswith("NVML sees no GPU but the PCI bus shows")


def test_nvml_failing_after_init_is_an_nvml_error(healthy: dict[str, Any], tmp_path: Path) -> None:
    broken = with_error(healthy, None, "nvmlDeviceGetCount()", pynvml.NVML_ERROR_UNKNOWN)
    report = replay(broken, tmp_path)
    assert report["exit_code"] == probe.EXIT_NVML_ERROR
    assert report["error"] == "NVMLError_Unknown: Unknown Error"


def test_check_gate(healthy: dict[str, Any], tmp_path: Path, capsys) -> None:
    sysfs = str(sysfs_tree(tmp_path / "devices", healthy["sysfs_pci_nvidia"] or {}))
    count = len(healthy["devices"])
    free = min(
        d["nvmlDeviceGetMemoryInfo()"]["result"]["fields"]["free"] for d in healthy["devices"]
    )
    free_mib = free // 2**20

    def gate(*argv: str) -> tuple[int, dict[str, Any]]:
        code = probe.main(["--check", *argv], nvml=FakeNvml(healthy), sysfs=sysfs)
        return code, json.loads(capsys.readouterr().out)

    assert gate()[0] == probe.EXIT_HEALTHY
    assert gate("--min-gpus", str(count), "--min-free-mib", str(free_mib))[0] == 0
    code, report = gate("--min-gpus", str(count + 1))
    assert code == probe.EXIT_CHECK_FAILED == 4
    assert report["check"]["problems"] == [
        f"need {count + 1} GPU(s) with 0 MiB free, have {count} (of {count})"
    ]
    code, report = gate("--min-free-mib", str(free_mib + 1))
    assert code == probe.EXIT_CHECK_FAILED
    assert report["check"]["fit_gpus"] == [
        i
        for i, d in enumerate(healthy["devices"])
        if d["nvmlDeviceGetMemoryInfo()"]["result"]["fields"]["free"] >= (free_mib + 1) * 2**20
    ]
    degraded = _derive(healthy, "nvmlDeviceGetRemappedRows()", _remapped(2, 1))
    code = probe.main(["--check"], nvml=FakeNvml(degraded), sysfs=sysfs)
    assert code == probe.EXIT_DEGRADED
    assert "row remapping pending" in capsys.readouterr().err
