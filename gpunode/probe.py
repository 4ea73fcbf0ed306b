#!/usr/bin/python3
"""gpunode-probe: what a node's NVIDIA GPUs are and whether they are healthy, as JSON.

Runs ON the node, installed by roles/gpu_probe.py as /usr/local/sbin/gpunode-probe
with nvidia-ml-py's single module ``pynvml.py`` beside it in /usr/local/lib/gpunode/.
It imports only the standard library and ``pynvml``, so those two files are all a
node needs (no pip, no network).

Usage::

    gpunode-probe                                   # JSON on stdout, exit code below
    gpunode-probe --check --min-gpus 2 --min-free-mib 40000   # the gate inference units run first

Exit codes (the one place they are defined; gpunode.gpus and the README use these):

    0   healthy: NVML answered, at least one GPU, no health problem (and --check conditions met)
    1   degraded: a GPU needs attention (uncorrected volatile ECC errors, retired pages or
        remapped rows pending a reset, row remapping failed, NVLink fabric not ready,
        at or above the slowdown temperature, or NVML lost the GPU)
    2   no GPU: NVML found no driver library / no loaded driver / zero devices, and the PCI
        bus shows no NVIDIA GPU either (a GPU-less host)
    3   NVML error: NVML failed (init error, an NVIDIA GPU on the PCI bus that NVML cannot see,
        driver/library mismatch, pynvml missing)
    4   check failed (--check only): fewer than --min-gpus GPUs with --min-free-mib MiB free each
    64  usage error (bad arguments; EX_USAGE, so it never reads as "no GPU")

JSON (``"schema": 1``; every key is always present, null where NVML does not support a reading)::

    {"schema": 1, "status": "healthy|degraded|no_gpu|nvml_error|check_failed", "exit_code": 0,
     "problems": ["gpu 0 (GPU-...): ..."], "error": null | "why NVML could not be used",
     "driver_version": "580.95.05", "cuda_version": "13.0", "nvml_version": "13.580.95.05",
     "gpu_count": 1, "pci_gpus": ["0000:01:00.0"] | null,
     "gpus": [{"index": 0, "uuid": "GPU-...", "name": "NVIDIA H100 80GB HBM3",
               "pci_bus_id": "00000000:01:00.0",
               "memory": {"total": bytes, "used": bytes, "free": bytes},
               "ecc": {"current": bool, "pending": bool,
                       "volatile_corrected": int, "volatile_uncorrected": int},
               "retired_pages_pending": bool, "remapped_rows":
                   {"correctable": int, "uncorrectable": int, "pending": bool, "failed": bool},
               "temperature_c": int, "slowdown_temperature_c": int,
               "power": {"draw_w": float, "limit_w": float},
               "persistence_mode": bool, "mig_mode": {"current": bool, "pending": bool},
               "pcie": {"gen": int, "width": int, "max_gen": int, "max_width": int},
               "fabric": {"state": "not_supported|not_started|in_progress|completed",
                          "status": int} | null,
               "problems": [...]}],
     "check": null | {"min_gpus": int, "min_free_mib": int, "fit_gpus": [indexes],
                      "problems": [...]}}
"""

from __future__ import annotations

import json
import os
import sys

TYPE_CHECKING = False  # typing (and argparse, below) cost a quarter of a plain run's start
if TYPE_CHECKING:
    from typing import Any

SCHEMA = 1
LIB_DIR = "/usr/local/lib/gpunode"  # where roles/gpu_probe.py puts pynvml.py
PROBE_PATH = "/usr/local/sbin/gpunode-probe"

EXIT_HEALTHY = 0
EXIT_DEGRADED = 1
EXIT_NO_GPU = 2
EXIT_NVML_ERROR = 3
EXIT_CHECK_FAILED = 4
EXIT_USAGE = 64
STATUS = {
    EXIT_HEALTHY: "healthy",
    EXIT_DEGRADED: "degraded",
    EXIT_NO_GPU: "no_gpu",
    EXIT_NVML_ERROR: "nvml_error",
    EXIT_CHECK_FAILED: "check_failed",
}

# The one command the pyinfra fact (gpunode.gpus.GpuProbe) runs per host. It always
# exits 0: the probe's own exit code travels on the last line. Before the probe is
# installed it lists the NVIDIA GPUs on the PCI bus instead (one "pci-gpu=ADDRESS" line
# each), so a first run can already tell a GPU-less host.
FACT_COMMAND = (
    'if [ -x {probe} ]; then {probe}; echo "gpunode-probe-exit=$?"; '
    "else for d in /sys/bus/pci/devices/*; do "
    'v=; c=; read -r v 2>/dev/null < "$d/vendor"; [ "$v" = 0x10de ] || continue; '
    'read -r c 2>/dev/null < "$d/class"; '
    'case "$c" in 0x03*) echo "pci-gpu=${{d##*/}}";; esac; '
    'done; echo "gpunode-probe-exit=not-installed"; fi'
)

# NVML argument values used below (nvml.h): memory error types, ECC counter types,
# temperature sensors and thresholds. Literal here so a recording's keys never depend
# on the pynvml version.
UNCORRECTED, CORRECTED = 1, 0  # nvmlMemoryErrorType_t
VOLATILE = 0  # nvmlEccCounterType_t NVML_VOLATILE_ECC
TEMPERATURE_GPU = 0  # nvmlTemperatureSensors_t NVML_TEMPERATURE_GPU
THRESHOLD_SLOWDOWN = 1  # nvmlTemperatureThresholds_t NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
FABRIC_STATES = {0: "not_supported", 1: "not_started", 2: "in_progress", 3: "completed"}

# NVML return codes (nvml.h) the probe tells apart.
ERROR_NOT_SUPPORTED = 3
ERROR_DRIVER_NOT_LOADED = 9
ERROR_LIBRARY_NOT_FOUND = 12
ERROR_FUNCTION_NOT_FOUND = 13
UNSUPPORTED = (ERROR_NOT_SUPPORTED, ERROR_FUNCTION_NOT_FOUND)
NO_DRIVER = (ERROR_DRIVER_NOT_LOADED, ERROR_LIBRARY_NOT_FOUND)

SYSFS_PCI = "/sys/bus/pci/devices"
NVIDIA_PCI_VENDOR = "0x10de"
DISPLAY_CLASS_PREFIX = "0x03"  # PCI class 03xx: VGA/3D controllers (NVSwitches are 0x0680)


class Unsupported(Exception):
    """NVML (or this pynvml) cannot give this reading on this GPU."""


def nvml_call(nvml: Any, name: str, *args: Any) -> Any:
    """``nvml.<name>(*args)``; NotSupported, FunctionNotFound or absent in pynvml: Unsupported."""
    function = getattr(nvml, name, None)
    if function is None:
        raise Unsupported(name)
    try:
        return function(*args)
    except nvml.NVMLError as exc:
        if getattr(exc, "value", None) in UNSUPPORTED:
            raise Unsupported(name) from None
        raise


def reading(nvml: Any, name: str, *args: Any) -> Any:
    try:
        return nvml_call(nvml, name, *args)
    except Unsupported:
        return None


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


def pci_nvidia_gpus(sysfs: str = SYSFS_PCI) -> list[str] | None:
    """PCI addresses of NVIDIA display/3D controllers; None when sysfs cannot be read."""
    try:
        addresses = sorted(os.listdir(sysfs))
    except OSError:
        return None
    found = []
    for address in addresses:
        try:
            with open(os.path.join(sysfs, address, "vendor")) as f:
                vendor = f.read().strip()
            with open(os.path.join(sysfs, address, "class")) as f:
                pci_class = f.read().strip()
        except OSError:
            continue
        if vendor == NVIDIA_PCI_VENDOR and pci_class.startswith(DISPLAY_CLASS_PREFIX):
            found.append(address)
    return found


def read_gpu(nvml: Any, index: int) -> dict[str, Any]:
    """One GPU's readings and its health problems. NVML errors other than
    'not supported' propagate (the caller turns them into a degraded GPU)."""
    handle = nvml_call(nvml, "nvmlDeviceGetHandleByIndex", index)
    memory = nvml_call(nvml, "nvmlDeviceGetMemoryInfo", handle)
    ecc_mode = reading(nvml, "nvmlDeviceGetEccMode", handle)
    remapped = reading(nvml, "nvmlDeviceGetRemappedRows", handle)
    power_mw = reading(nvml, "nvmlDeviceGetPowerUsage", handle)
    limit_mw = reading(nvml, "nvmlDeviceGetEnforcedPowerLimit", handle)
    mig = reading(nvml, "nvmlDeviceGetMigMode", handle)
    pci = reading(nvml, "nvmlDeviceGetPciInfo", handle)
    ecc_on = bool(ecc_mode and ecc_mode[0])
    gpu: dict[str, Any] = {
        "index": index,
        "uuid": _text(nvml_call(nvml, "nvmlDeviceGetUUID", handle)),
        "name": _text(nvml_call(nvml, "nvmlDeviceGetName", handle)),
        "pci_bus_id": _text(pci.busId) if pci is not None else None,
        "memory": {"total": memory.total, "used": memory.used, "free": memory.free},
        "ecc": {
            "current": _bool(ecc_mode[0]) if ecc_mode else None,
            "pending": _bool(ecc_mode[1]) if ecc_mode else None,
            "volatile_corrected": reading(
                nvml, "nvmlDeviceGetTotalEccErrors", handle, CORRECTED, VOLATILE
            )
            if ecc_on
            else None,
            "volatile_uncorrected": reading(
                nvml, "nvmlDeviceGetTotalEccErrors", handle, UNCORRECTED, VOLATILE
            )
            if ecc_on
            else None,
        },
        "retired_pages_pending": _bool(
            reading(nvml, "nvmlDeviceGetRetiredPagesPendingStatus", handle)
        ),
        "remapped_rows": {
            "correctable": remapped[0],
            "uncorrectable": remapped[1],
            "pending": bool(remapped[2]),
            "failed": bool(remapped[3]),
        }
        if remapped is not None
        else None,
        "temperature_c": reading(nvml, "nvmlDeviceGetTemperature", handle, TEMPERATURE_GPU),
        "slowdown_temperature_c": reading(
            nvml, "nvmlDeviceGetTemperatureThreshold", handle, THRESHOLD_SLOWDOWN
        ),
        "power": {
            "draw_w": power_mw / 1000 if power_mw is not None else None,
            "limit_w": limit_mw / 1000 if limit_mw is not None else None,
        },
        "persistence_mode": _bool(reading(nvml, "nvmlDeviceGetPersistenceMode", handle)),
        "mig_mode": {"current": bool(mig[0]), "pending": bool(mig[1])} if mig else None,
        "pcie": {
            "gen": reading(nvml, "nvmlDeviceGetCurrPcieLinkGeneration", handle),
            "width": reading(nvml, "nvmlDeviceGetCurrPcieLinkWidth", handle),
            "max_gen": reading(nvml, "nvmlDeviceGetMaxPcieLinkGeneration", handle),
            "max_width": reading(nvml, "nvmlDeviceGetMaxPcieLinkWidth", handle),
        },
        "fabric": read_fabric(nvml, handle),
    }
    gpu["problems"] = gpu_problems(gpu)
    return gpu


def read_fabric(nvml: Any, handle: Any) -> dict[str, Any] | None:
    """NVLink fabric state (NVSwitch systems, registered by nvidia-fabricmanager)."""
    struct = getattr(nvml, "c_nvmlGpuFabricInfo_t", None)
    if struct is None:
        return None
    info = struct()
    try:
        nvml_call(nvml, "nvmlDeviceGetGpuFabricInfo", handle, info)
    except Unsupported:
        return None
    return {"state": FABRIC_STATES.get(info.state, str(info.state)), "status": info.status}


def gpu_problems(gpu: dict[str, Any]) -> list[str]:
    """Health rules: what makes a GPU 'degraded' (see the exit codes)."""
    problems = []
    if gpu["ecc"]["volatile_uncorrected"]:
        problems.append(
            f"{gpu['ecc']['volatile_uncorrected']} uncorrected ECC errors since the last reset"
        )
    if gpu["retired_pages_pending"]:
        problems.append("retired pages pending: reset or reboot the GPU")
    rows = gpu["remapped_rows"]
    if rows and rows["pending"]:
        problems.append("row remapping pending: reset the GPU")
    if rows and rows["failed"]:
        problems.append("row remapping failed: the GPU needs service")
    temp, slowdown = gpu["temperature_c"], gpu["slowdown_temperature_c"]
    if temp is not None and slowdown and temp >= slowdown:
        problems.append(f"temperature {temp} C at or above slowdown {slowdown} C")
    fabric = gpu["fabric"]
    if fabric and fabric["state"] not in ("not_supported", "completed"):
        problems.append(f"NVLink fabric {fabric['state']}: is nvidia-fabricmanager running?")
    elif fabric and fabric["state"] == "completed" and fabric["status"] != 0:
        problems.append(f"NVLink fabric registration failed (NVML status {fabric['status']})")
    return [f"gpu {gpu['index']} ({gpu['uuid']}): {p}" for p in problems]


def empty_report() -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "status": None,
        "exit_code": None,
        "problems": [],
        "error": None,
        "driver_version": None,
        "cuda_version": None,
        "nvml_version": None,
        "gpu_count": 0,
        "pci_gpus": None,
        "gpus": [],
        "check": None,
    }


def _finish(report: dict[str, Any], code: int) -> dict[str, Any]:
    report["exit_code"] = code
    report["status"] = STATUS[code]
    return report


def collect(nvml: Any, sysfs: str = SYSFS_PCI) -> dict[str, Any]:
    """The whole report from an NVML module (pynvml, or a fake replaying a recording)."""
    report = empty_report()
    report["pci_gpus"] = pci_nvidia_gpus(sysfs)
    on_pci = len(report["pci_gpus"] or [])
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        report["error"] = f"nvmlInit: {type(exc).__name__}: {exc}"
        if getattr(exc, "value", None) in NO_DRIVER and not on_pci:
            return _finish(report, EXIT_NO_GPU)
        if on_pci:
            report["error"] += f" (but {on_pci} NVIDIA GPU(s) on the PCI bus)"
        return _finish(report, EXIT_NVML_ERROR)
    try:
        report["driver_version"] = _text(reading(nvml, "nvmlSystemGetDriverVersion"))
        report["nvml_version"] = _text(reading(nvml, "nvmlSystemGetNVMLVersion"))
        cuda = reading(nvml, "nvmlSystemGetCudaDriverVersion_v2")
        if cuda is not None:  # e.g. 13000 -> "13.0" (nvml.h NVML_CUDA_DRIVER_VERSION_MAJOR/MINOR)
            report["cuda_version"] = f"{cuda // 1000}.{cuda % 1000 // 10}"
        count = nvml_call(nvml, "nvmlDeviceGetCount")
        report["gpu_count"] = count
        for index in range(count):
            try:
                gpu = read_gpu(nvml, index)
            except (nvml.NVMLError, Unsupported) as exc:
                gpu = {"index": index, "error": f"{type(exc).__name__}: {exc}"}
                gpu["problems"] = [f"gpu {index}: NVML cannot read it ({gpu['error']})"]
            report["gpus"].append(gpu)
            report["problems"].extend(gpu["problems"])
    except (nvml.NVMLError, Unsupported) as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
        return _finish(report, EXIT_NVML_ERROR)
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass
    if count == 0:
        if on_pci:
            report["error"] = f"NVML sees no GPU but the PCI bus shows {on_pci} NVIDIA GPU(s)"
            return _finish(report, EXIT_NVML_ERROR)
        return _finish(report, EXIT_NO_GPU)
    return _finish(report, EXIT_DEGRADED if report["problems"] else EXIT_HEALTHY)


def check(report: dict[str, Any], min_gpus: int, min_free_mib: int) -> dict[str, Any]:
    """The gate: at least ``min_gpus`` healthy-read GPUs with ``min_free_mib`` MiB free each."""
    fit = [
        gpu["index"]
        for gpu in report["gpus"]
        if "memory" in gpu and gpu["memory"]["free"] >= min_free_mib * 2**20
    ]
    problems = []
    if report["exit_code"] == EXIT_HEALTHY and len(fit) < min_gpus:
        problems.append(
            f"need {min_gpus} GPU(s) with {min_free_mib} MiB free, have {len(fit)} "
            f"(of {report['gpu_count']})"
        )
    report["check"] = {
        "min_gpus": min_gpus,
        "min_free_mib": min_free_mib,
        "fit_gpus": fit,
        "problems": problems,
    }
    if problems:
        _finish(report, EXIT_CHECK_FAILED)
    return report


class Options:
    """The command line: ``--check`` and its two thresholds."""

    def __init__(self, check: bool = False, min_gpus: int = 1, min_free_mib: int = 0) -> None:
        self.check, self.min_gpus, self.min_free_mib = check, min_gpus, min_free_mib


def parse_args(argv: list[str] | None) -> Options:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # the fact's and the seal's plain run: argparse is not even imported
        return Options()
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> Any:  # argparse exits 2, which means "no GPU" here
            self.print_usage(sys.stderr)
            self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

    parser = Parser(
        prog="gpunode-probe",
        description="Report the node's NVIDIA GPUs and their health as JSON "
        "(exit 0 healthy, 1 degraded, 2 no GPU, 3 NVML error, 4 --check failed, 64 usage).",
    )
    parser.add_argument("--check", action="store_true", help="gate: exit 0 only when fit to run")
    parser.add_argument("--min-gpus", type=int, metavar="N", help="with --check (default 1)")
    parser.add_argument("--min-free-mib", type=int, metavar="M", help="with --check (default 0)")
    args = parser.parse_args(argv)
    if not args.check and (args.min_gpus is not None or args.min_free_mib is not None):
        parser.error("--min-gpus and --min-free-mib go with --check")
    options = Options(
        args.check,
        1 if args.min_gpus is None else args.min_gpus,
        0 if args.min_free_mib is None else args.min_free_mib,
    )
    if options.min_gpus < 0 or options.min_free_mib < 0:
        parser.error("--min-gpus and --min-free-mib take numbers >= 0")
    return options


def import_nvml() -> Any:
    if os.path.isdir(LIB_DIR) and LIB_DIR not in sys.path:
        sys.path.insert(0, LIB_DIR)
        sys.dont_write_bytecode = True  # LIB_DIR holds exactly what roles/gpu_probe.py put there
    import pynvml

    return pynvml


def main(argv: list[str] | None = None, nvml: Any = None, sysfs: str = SYSFS_PCI) -> int:
    args = parse_args(argv)
    try:
        report = collect(nvml if nvml is not None else import_nvml(), sysfs)
    except ImportError as exc:
        report = empty_report()
        report["error"] = f"pynvml cannot be imported ({exc}): reinstall gpunode-probe"
        _finish(report, EXIT_NVML_ERROR)
    except Exception as exc:  # noqa: BLE001 - e.g. a pynvml too old for the driver: exit 3, not 1
        report = empty_report()
        report["error"] = f"probe failed: {type(exc).__name__}: {exc}"
        _finish(report, EXIT_NVML_ERROR)
    if args.check:
        check(report, args.min_gpus, args.min_free_mib)
    print(json.dumps(report, sort_keys=True))
    if args.check and report["exit_code"] != EXIT_HEALTHY:
        reasons = report["problems"] + report["check"]["problems"] + [report["error"] or ""]
        print(
            f"gpunode-probe: {report['status']}: {'; '.join(r for r in reasons if r)}",
            file=sys.stderr,
        )
    return int(report["exit_code"])


if __name__ == "__main__":
    sys.exit(main())
