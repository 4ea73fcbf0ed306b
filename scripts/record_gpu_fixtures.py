#!/usr/bin/env python3
"""Record what gpunode's GPU code sees on a real GPU machine, as test fixtures.

Run it as root on a machine with an NVIDIA GPU, its driver, nvidia-smi and
nvidia-ml-py (``pynvml``), from a copy of this repository::

    python3 scripts/record_gpu_fixtures.py          # writes $OUT/gpu-fixtures/ (or ./gpu-fixtures/)

It needs only the standard library and pynvml, never the network, and finishes in
seconds. Every step is caught and recorded in ``manifest.json``: a failing step
never stops the others. What it writes, under ``gpu-fixtures/<gpu-name-slug>/``
(copy that folder to ``tests/unit/fixtures/gpu/``):

- ``nvml.json``: the RAW result, or the NVML error class and value, of every NVML call
  gpunode/probe.py makes (recorded by running the probe against a recording proxy of
  pynvml), plus a few more readings, per device; and the NVIDIA devices in PCI sysfs.
  ``tests/unit/fake_nvml.py`` replays it.
- ``probe-inprocess.json``: the probe's report from that same recorded NVML session.
- ``probe.out`` / ``probe-check*.out``: ``python3 gpunode/probe.py [--check ...]`` stdout
  (exit codes and stderr in the manifest).
- ``fact.out``: the exact shell command of the pyinfra fact ``gpunode.facts.nvidia.GpuProbe``
  (probe.FACT_COMMAND), run against a copy of the probe installed in a temporary folder.
- ``nvidia-smi-q.xml``, ``nvidia-smi-query*.csv``, ``nvidia-smi-L.out``,
  ``proc-driver-version.out``, ``dev-nvidia.out``, ``nvswitch-devices.out``, ``lspci.out``,
  ``sys-module-nvidia-version.out``, ``systemctl-*.out``, ...: raw outputs for the driver facts.
- ``host-checks.out``: tests/host/test_gpu.py run with testinfra's local backend when
  pytest, testinfra and gpunode's own dependencies are importable here; otherwise the
  manifest says they were not run and why.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PROBE_FILE = REPO / "gpunode" / "probe.py"
FORMAT = 1
STEP_TIMEOUT = 15  # seconds per command
BUDGET = 50  # seconds: optional steps are skipped past this

# NVML readings recorded on top of the probe's own calls, so later probe versions (and
# the driver/CUDA facts) can be tested against real values. (name, args after the handle);
# "OUT:<struct>" is an output struct pynvml fills in. No serial numbers are recorded.
EXTRA_SYSTEM_CALLS: list[tuple[str, tuple[Any, ...]]] = [
    ("nvmlSystemGetDriverVersion", ()),
    ("nvmlSystemGetNVMLVersion", ()),
    ("nvmlSystemGetCudaDriverVersion", ()),
    ("nvmlSystemGetCudaDriverVersion_v2", ()),
    ("nvmlDeviceGetCount", ()),
]
EXTRA_DEVICE_CALLS: list[tuple[str, tuple[Any, ...]]] = [
    ("nvmlDeviceGetName", ()),
    ("nvmlDeviceGetUUID", ()),
    ("nvmlDeviceGetIndex", ()),
    ("nvmlDeviceGetMinorNumber", ()),
    ("nvmlDeviceGetBrand", ()),
    ("nvmlDeviceGetArchitecture", ()),
    ("nvmlDeviceGetCudaComputeCapability", ()),
    ("nvmlDeviceGetVbiosVersion", ()),
    ("nvmlDeviceGetBoardPartNumber", ()),
    ("nvmlDeviceGetPciInfo", ()),
    ("nvmlDeviceGetPciInfo_v3", ()),
    ("nvmlDeviceGetMemoryInfo", ()),
    ("nvmlDeviceGetMemoryInfo", ("ATTR:nvmlMemory_v2",)),
    ("nvmlDeviceGetBAR1MemoryInfo", ()),
    ("nvmlDeviceGetEccMode", ()),
    ("nvmlDeviceGetDefaultEccMode", ()),
    ("nvmlDeviceGetTotalEccErrors", (0, 0)),
    ("nvmlDeviceGetTotalEccErrors", (1, 0)),
    ("nvmlDeviceGetTotalEccErrors", (0, 1)),
    ("nvmlDeviceGetTotalEccErrors", (1, 1)),
    ("nvmlDeviceGetRetiredPagesPendingStatus", ()),
    ("nvmlDeviceGetRetiredPages", (0,)),
    ("nvmlDeviceGetRetiredPages", (1,)),
    ("nvmlDeviceGetRemappedRows", ()),
    ("nvmlDeviceGetTemperature", (0,)),
    ("nvmlDeviceGetTemperatureThreshold", (0,)),
    ("nvmlDeviceGetTemperatureThreshold", (1,)),
    ("nvmlDeviceGetTemperatureThreshold", (3,)),
    ("nvmlDeviceGetFanSpeed", ()),
    ("nvmlDeviceGetPowerUsage", ()),
    ("nvmlDeviceGetEnforcedPowerLimit", ()),
    ("nvmlDeviceGetPowerManagementLimit", ()),
    ("nvmlDeviceGetPowerManagementDefaultLimit", ()),
    ("nvmlDeviceGetPowerState", ()),
    ("nvmlDeviceGetPersistenceMode", ()),
    ("nvmlDeviceGetComputeMode", ()),
    ("nvmlDeviceGetMigMode", ()),
    ("nvmlDeviceGetMaxMigDeviceCount", ()),
    ("nvmlDeviceGetCurrPcieLinkGeneration", ()),
    ("nvmlDeviceGetCurrPcieLinkWidth", ()),
    ("nvmlDeviceGetMaxPcieLinkGeneration", ()),
    ("nvmlDeviceGetMaxPcieLinkWidth", ()),
    ("nvmlDeviceGetUtilizationRates", ()),
    ("nvmlDeviceGetCurrentClocksEventReasons", ()),
    ("nvmlDeviceGetGpuFabricInfo", ("OUT:c_nvmlGpuFabricInfo_t",)),
    # Not recorded: nvmlDeviceGetGpuFabricInfoV segfaulted (pynvml 13, H100, driver 580.159.04).
    *[("nvmlDeviceGetNvLinkState", (link,)) for link in range(18)],
]
QUERY_FIELDS = [
    "index,uuid,name,pci.bus_id,driver_version,memory.total,memory.used,memory.free,"
    "persistence_mode,temperature.gpu,power.draw,power.limit",
    "index,ecc.mode.current,ecc.mode.pending,ecc.errors.uncorrected.volatile.total,"
    "retired_pages.pending,mig.mode.current,mig.mode.pending,pcie.link.gen.current,"
    "pcie.link.width.current,compute_cap",
]


class Manifest:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.started = time.monotonic()
        self.data: dict[str, Any] = {"format": FORMAT, "steps": {}}

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def step(self, name: str, function: Any, *args: Any) -> Any:
        began = time.monotonic()
        entry: dict[str, Any] = {}
        self.data["steps"][name] = entry
        try:
            result = function(*args)
            entry["ok"] = True
            if isinstance(result, dict):
                entry.update(result)
            return result
        except Exception as exc:  # noqa: BLE001 - record every failure, never stop halfway
            entry["ok"] = False
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc(limit=5)
            return None
        finally:
            entry["seconds"] = round(time.monotonic() - began, 3)

    def write(self) -> None:
        self.data["seconds"] = round(self.elapsed(), 3)
        (self.out / "manifest.json").write_text(json.dumps(self.data, indent=2, sort_keys=True))


def run(
    out: Path, name: str, argv: list[str] | str, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run a command; save stdout to ``<name>``; return rc and stderr for the manifest."""
    shell = isinstance(argv, str)
    if not shell and shutil.which(argv[0]) is None and not os.path.exists(argv[0]):
        return {"command": argv, "skipped": f"{argv[0]} not found"}
    proc = subprocess.run(
        argv,
        shell=shell,  # noqa: S602 - fixed command lines written in this file
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )
    (out / name).write_text(proc.stdout)
    return {"command": argv, "file": name, "rc": proc.returncode, "stderr": proc.stderr[-4000:]}


# --- NVML recording -------------------------------------------------------------------


def encode(value: Any) -> Any:
    """A pynvml result as JSON the fake NVML can turn back into the same shapes."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return {"__bytes__": value.decode("utf-8", "replace")}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, ctypes.Structure) or hasattr(value, "_fields_"):  # also a replayed one
        fields = {name: encode(getattr(value, name)) for name, *_ in value._fields_}
        return {"__struct__": type(value).__name__, "fields": fields}
    if isinstance(value, ctypes.Array):
        return [encode(v) for v in value]
    if isinstance(value, ctypes._SimpleCData):
        return encode(value.value)
    return {"__repr__": repr(value)}


def handle_key(value: Any) -> Any:
    """pynvml handles are ctypes pointers: the same device, the same address."""
    if isinstance(value, ctypes._Pointer):
        return ("address", ctypes.cast(value, ctypes.c_void_p).value)
    return ("object", id(value))


class RecordingNvml:
    """Stands in for the pynvml module: passes every call through, writes down each
    first call's result or NVML error, per device (handles become device indexes)."""

    def __init__(self, pynvml: Any) -> None:
        self._real = pynvml
        self._handles: dict[Any, int] = {}  # handle_key(handle) -> device index
        self._keep: list[Any] = []  # handles stay alive, so their keys stay unique
        self.system: dict[str, Any] = {}
        self.devices: dict[int, dict[str, Any]] = {}
        self.missing: list[str] = []

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._real, name, None)
        if not name.startswith("nvml"):
            if real is None:
                raise AttributeError(name)
            return real
        if real is None:
            if name not in self.missing:
                self.missing.append(name)
            return None
        if not callable(real):
            return real  # a constant such as nvmlMemory_v2

        def call(*args: Any) -> Any:
            return self._call(name, real, args)

        return call

    def _call(self, name: str, real: Any, args: tuple[Any, ...]) -> Any:
        device = None
        parts = []
        outs = []
        for arg in args:
            index = self._handles.get(handle_key(arg))
            if index is not None and device is None:
                device = index
            elif isinstance(arg, ctypes.Structure):
                parts.append("out")
                outs.append(arg)
            else:
                parts.append(repr(arg))
        key = f"{name}({', '.join(parts)})"
        book = self.system if device is None else self.devices.setdefault(device, {})
        outcome: dict[str, Any] = {}
        try:
            result = real(*args)
        except self._real.NVMLError as exc:
            outcome = {"error": type(exc).__name__, "value": exc.value, "message": str(exc)}
            book.setdefault(key, outcome)
            raise
        except Exception as exc:  # a pynvml/driver mismatch: replayed as this exception
            outcome = {"error": type(exc).__name__, "python": True, "message": str(exc)}
            book.setdefault(key, outcome)
            raise
        if name == "nvmlDeviceGetHandleByIndex":
            self._handles[handle_key(result)] = args[0]
            self._keep.append(result)
            outcome = {"result": {"__handle__": args[0]}}
        else:
            outcome = {"result": encode(result)}
        if outs:
            outcome["out"] = [encode(o) for o in outs]
        book.setdefault(key, outcome)
        return result


def load_probe() -> Any:
    spec = importlib.util.spec_from_file_location("gpunode_probe", PROBE_FILE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def sysfs_nvidia(sysfs: str = "/sys/bus/pci/devices") -> dict[str, dict[str, str]]:
    devices = {}
    for address in sorted(os.listdir(sysfs)):
        attrs = {}
        for attr in ("vendor", "device", "class"):
            try:
                attrs[attr] = Path(sysfs, address, attr).read_text().strip()
            except OSError:
                attrs[attr] = ""
        if attrs["vendor"] == "0x10de":
            devices[address] = attrs
    return devices


def record_nvml(state: dict[str, Any]) -> dict[str, Any]:
    probe = state["probe"]
    pynvml = probe.import_nvml()

    try:
        version = importlib.metadata.version("nvidia-ml-py")
    except importlib.metadata.PackageNotFoundError:
        version = None
    recorder = RecordingNvml(pynvml)
    extras: dict[str, Any] = {}
    try:
        state["report"] = probe.collect(recorder)
    except Exception as exc:  # noqa: BLE001 - still keep what was recorded
        extras["probe"] = f"{type(exc).__name__}: {exc}"
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001, S110 - a session may not be open
            pass
    try:
        recorder.nvmlInit()
        for name, args in EXTRA_SYSTEM_CALLS:
            _extra(recorder, pynvml, name, None, args, extras)
        count = pynvml.nvmlDeviceGetCount()
        for index in range(count):
            handle = recorder.nvmlDeviceGetHandleByIndex(index)
            for name, args in EXTRA_DEVICE_CALLS:
                _extra(recorder, pynvml, name, handle, args, extras)
        recorder.nvmlShutdown()
    except pynvml.NVMLError as exc:
        extras["session"] = f"{type(exc).__name__}: {exc}"
    names = [d.get("nvmlDeviceGetName()", {}).get("result") for d in recorder.devices.values()]
    state["slug"] = slug(names[0]) if names and isinstance(names[0], str) else "no-gpu"
    recording = {
        "format": FORMAT,
        "pynvml": {"nvidia-ml-py": version, "file": getattr(pynvml, "__file__", None)},
        "missing_in_pynvml": recorder.missing,
        "system": recorder.system,
        "devices": [recorder.devices[i] for i in sorted(recorder.devices)],
        "sysfs_pci_nvidia": state.get("sysfs"),
        "extra_call_failures": extras,
    }
    state["recording"] = recording
    return {"devices": len(recording["devices"]), "slug": state["slug"]}


def _extra(rec: RecordingNvml, pynvml: Any, name: str, handle: Any, args: Any, log: dict) -> None:
    real_args: list[Any] = [] if handle is None else [handle]
    for arg in args:
        if isinstance(arg, str) and arg.startswith("OUT:"):
            struct = getattr(pynvml, arg[4:], None)
            if struct is None:
                log[f"{name}{args}"] = f"pynvml has no {arg[4:]}"
                return
            real_args.append(struct())
        elif isinstance(arg, str) and arg.startswith("ATTR:"):
            value = getattr(pynvml, arg[5:], None)
            if value is None:
                log[f"{name}{args}"] = f"pynvml has no {arg[5:]}"
                return
            real_args.append(value)
        else:
            real_args.append(arg)
    function = getattr(rec, name)
    if function is None:
        return  # recorded under missing_in_pynvml
    try:
        function(*real_args)
    except pynvml.NVMLError:
        pass  # recorded
    except Exception as exc:  # noqa: BLE001 - a pynvml/driver mismatch must not stop the run
        log[f"{name}{args}"] = f"{type(exc).__name__}: {exc}"


# --- the other steps ------------------------------------------------------------------


def run_probe_variants(out: Path, manifest: Manifest, count: int) -> None:
    py = sys.executable
    probe = str(PROBE_FILE.relative_to(REPO))
    variants = {
        "probe.out": [py, probe],
        "probe-check.out": [py, probe, "--check"],
        "probe-check-min-gpus.out": [py, probe, "--check", "--min-gpus", str(count + 1)],
        "probe-check-min-free.out": [py, probe, "--check", "--min-free-mib", "100000000"],
        "probe-usage.out": [py, probe, "--min-gpus", "x"],
    }
    for name, argv in variants.items():
        manifest.step(name, run, out, name, argv)


def run_fact(out: Path, probe: Any) -> dict[str, Any]:
    """The fact's exact command, with the probe installed like the role installs it
    (a copy with a python3 shebang), in a temporary folder instead of /usr/local/sbin."""
    with tempfile.TemporaryDirectory() as tmp:
        installed = Path(tmp, "gpunode-probe")
        source = PROBE_FILE.read_text().split("\n", 1)[1]
        # this python has pynvml; the node's /usr/bin/python3 gets pynvml.py from LIB_DIR
        installed.write_text(f"#!{sys.executable}\n{source}")
        installed.chmod(0o755)
        command = probe.FACT_COMMAND.format(probe=installed)
        result = run(out, "fact.out", command)
        missing = probe.FACT_COMMAND.format(probe=Path(tmp, "not-there"))
        absent = run(out, "fact-not-installed.out", missing)
    result["command_template"] = probe.FACT_COMMAND
    result["not_installed"] = absent
    return result


def run_host_checks(out: Path, recording: dict[str, Any] | None) -> dict[str, Any]:
    needed = ["pytest", "testinfra", "pydantic", "yaml", "pyinfra"]
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        (out / "host-checks.out").write_text(f"not run: {', '.join(missing)} not importable\n")
        return {"run": False, "reason": f"not importable here: {', '.join(missing)}"}
    if not recording or not recording["devices"]:
        return {"run": False, "reason": "no GPU recorded"}
    driver = recording["system"].get("nvmlSystemGetDriverVersion()", {}).get("result")
    data: dict[str, Any] = {"gpu": {"required": True, "count": len(recording["devices"])}}
    sys.path.insert(0, str(REPO))  # this checkout's gpunode (its dependencies are checked above)
    from gpunode.schema.distros import DISTROS

    release = dict(
        line.split("=", 1)
        for line in Path("/etc/os-release").read_text().splitlines()
        if "=" in line
    )
    os_id, version = release.get("ID", "").strip('"'), release.get("VERSION_ID", "").strip('"')
    for key, row in DISTROS.items():
        if os_id in row.os_ids and (
            version == row.version_id or version.startswith(row.version_id + ".")
        ):
            data["distro"] = key
            break
    if isinstance(driver, str):
        data["nvidia"] = {"branch": driver.split(".")[0], "version": driver}
    inventory = {
        "hosts": {"gpu-recorded": {"connection": {"address": "127.0.0.1"}, "data": data}},
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "inventory.yml")
        path.write_text(json.dumps(inventory))  # JSON is YAML
        env = {
            "GPUNODE_INVENTORY": str(path),
            "GPUNODE_HOST": "gpu-recorded",
            # the probe from this checkout, run by this python (which has pynvml)
            "GPUNODE_PROBE": f"{shlex.quote(sys.executable)} {shlex.quote(str(PROBE_FILE))}",
        }
        argv = [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-rA",
            "--hosts=local://",
            "tests/host/test_gpu.py",
        ]
        result = run(out, "host-checks.out", argv, env)
    result["inventory"] = inventory
    return result


COMMANDS: dict[str, list[str] | str] = {
    "nvidia-smi-q.xml": ["nvidia-smi", "-q", "-x"],
    "nvidia-smi-L.out": ["nvidia-smi", "-L"],
    "nvidia-smi.out": ["nvidia-smi"],
    "nvidia-smi-query.csv": ["nvidia-smi", f"--query-gpu={QUERY_FIELDS[0]}", "--format=csv"],
    "nvidia-smi-query-health.csv": [
        "nvidia-smi",
        f"--query-gpu={QUERY_FIELDS[1]}",
        "--format=csv",
    ],
    "nvidia-smi-query-noheader.csv": [
        "nvidia-smi",
        "--query-gpu=index,uuid,name,driver_version,memory.total",
        "--format=csv,noheader,nounits",
    ],
    "proc-driver-version.out": "cat /proc/driver/nvidia/version",
    "proc-driver-gpus.out": "for f in /proc/driver/nvidia/gpus/*/information; "
    'do echo "== $f"; cat "$f"; done',
    "sys-module-nvidia-version.out": "cat /sys/module/nvidia/version",
    "dev-nvidia.out": "ls -l /dev/nvidia* /dev/nvidia-caps 2>&1",
    "nvswitch-devices.out": "ls -l /proc/driver/nvidia-nvswitch/devices 2>&1",
    "lspci.out": "command -v lspci >/dev/null && lspci -nn | grep -i nvidia",
    "lsmod-nvidia.out": "lsmod 2>/dev/null | grep -i nvidia || grep -i nvidia /proc/modules",
    "modinfo-nvidia-version.out": "modinfo -F version nvidia 2>&1",
    "systemctl-nvidia.out": "for u in nvidia-persistenced nvidia-fabricmanager nvidia-dcgm; "
    'do printf "%s " "$u"; systemctl is-active "$u" 2>&1; done',
    "nvcc-version.out": "nvcc --version 2>&1 || /usr/local/cuda/bin/nvcc --version 2>&1",
    "modinfo-nvidia.out": "modinfo nvidia 2>&1 | grep -v -E '^(parm|sig|alias)'",
    "packages-nvidia.out": "dpkg-query -W -f='${Package} ${Version} ${db:Status-Abbrev}\\n' "
    "'*nvidia*' 'cuda*' 'libnvidia*' 'datacenter-gpu-manager*' 2>/dev/null "
    "|| rpm -qa '*nvidia*' 'cuda*' 'datacenter-gpu-manager*'",
    "cuda-dirs.out": "ls -d /usr/local/cuda* 2>&1; readlink -f /usr/local/cuda 2>&1",
    "nvidia-tools-versions.out": "for t in nvidia-ctk nvidia-container-cli dcgmi "
    'nv-fabricmanager nvidia-persistenced; do echo "== $t"; $t --version 2>&1 | head -3; done',
    "nvidia-smi-topo.out": ["nvidia-smi", "topo", "-m"],
    "os-release.out": "cat /etc/os-release; uname -r",
}


def main() -> int:
    base = Path(os.environ.get("OUT") or ".") / "gpu-fixtures"
    staging = base / "_staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    manifest = Manifest(staging)
    manifest.data["machine"] = {
        "python": sys.version,
        "platform": platform.platform(),
        "uid": os.getuid(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    state: dict[str, Any] = {}
    state["probe"] = manifest.step("load-probe", load_probe)
    state["sysfs"] = manifest.step("sysfs-pci-nvidia", sysfs_nvidia)
    if state["probe"] is not None:
        manifest.step("nvml", record_nvml, state)
    recording = state.get("recording")
    if recording is not None:
        (staging / "nvml.json").write_text(json.dumps(recording, indent=1, sort_keys=True))
    if state.get("report") is not None:
        (staging / "probe-inprocess.json").write_text(json.dumps(state["report"], sort_keys=True))
    count = len(recording["devices"]) if recording else 0
    run_probe_variants(staging, manifest, count)
    if state["probe"] is not None:
        manifest.step("fact.out", run_fact, staging, state["probe"])
    for name, command in COMMANDS.items():
        if manifest.elapsed() > BUDGET:
            manifest.data["steps"][name] = {"ok": False, "skipped": "time budget spent"}
            continue
        manifest.step(name, run, staging, name, command)
    if manifest.elapsed() < BUDGET:
        manifest.step("host-checks.out", run_host_checks, staging, recording)
    target = base / state.get("slug", "no-nvml")
    manifest.data["directory"] = target.name
    manifest.write()
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    failed = [name for name, step in manifest.data["steps"].items() if not step.get("ok")]
    seconds = manifest.data["seconds"]
    print(f"gpu fixtures: {target} ({seconds} s; steps failed: {failed or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
