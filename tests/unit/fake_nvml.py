"""A fake NVML that replays what scripts/record_gpu_fixtures.py recorded on a real GPU.

``FakeNvml(recording)`` stands in for the ``pynvml`` module: each ``nvml*`` call
returns the recorded result (ctypes structures come back as objects with the same
attributes; output structures are filled in) or raises the recorded NVML error
(the real pynvml error class for the recorded value). Constants, structure
classes and error classes are the real pynvml ones. A call that was never
recorded raises ``NotRecorded``: tests can only see values a real GPU gave.

``with_reading(recording, device, key, result)`` derives a variant with ONE recorded
reading replaced (how the degraded cases are made from a healthy recording).
"""

from __future__ import annotations

import builtins
import copy
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml

FIXTURES = Path(__file__).parent / "fixtures" / "gpu"


class NotRecorded(LookupError):
    """The code under test made an NVML call the recording does not have."""


def recordings() -> list[Path]:
    """Every recorded machine (a folder with nvml.json) under tests/unit/fixtures/gpu/."""
    return sorted(p.parent for p in FIXTURES.glob("*/nvml.json"))


def load(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "nvml.json").read_text())


def decode(value: Any) -> Any:
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, dict):
        if "__tuple__" in value:
            return tuple(decode(v) for v in value["__tuple__"])
        if "__bytes__" in value:
            return value["__bytes__"].encode()
        if "__handle__" in value:
            return FakeHandle(value["__handle__"])
        if "__struct__" in value:
            return _struct(value["__struct__"], {k: decode(v) for k, v in value["fields"].items()})
        if "__repr__" in value:
            raise NotRecorded(f"recorded only as {value['__repr__']}")
    return value


def _struct(name: str, fields: dict[str, Any]) -> Any:
    """A recorded ctypes structure: same type name, same attributes, and ``_fields_`` (so
    the recorder can record a replayed one again)."""
    struct = type(name, (SimpleNamespace,), {})(**fields)
    struct._fields_ = [(field, None) for field in fields]
    return struct


def _key_arg(arg: Any) -> str:
    return "out" if hasattr(arg, "_fields_") else repr(arg)


class FakeHandle:
    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"<gpu {self.index}>"


class FakeNvml:
    def __init__(self, recording: dict[str, Any]) -> None:
        self.recording = recording
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("nvml"):
            return getattr(pynvml, name)
        if name in self.recording.get("missing_in_pynvml", []):
            return None
        if not callable(getattr(pynvml, name, len)):
            return getattr(pynvml, name)  # a constant such as nvmlMemory_v2

        def replay(*args: Any) -> Any:
            return self._replay(name, args)

        return replay

    def _replay(self, name: str, args: tuple[Any, ...]) -> Any:
        device = next((a.index for a in args if isinstance(a, FakeHandle)), None)
        rest = [a for a in args if not isinstance(a, FakeHandle)]
        key = f"{name}({', '.join(_key_arg(a) for a in rest)})"
        book = self.recording["system"] if device is None else self.recording["devices"][device]
        self.calls.append(key if device is None else f"gpu{device}:{key}")
        if key not in book:
            where = "system" if device is None else f"device {device}"
            raise NotRecorded(f"{key} was not recorded ({where})")
        outcome = book[key]
        if "error" in outcome:
            if outcome.get("python"):
                raise getattr(builtins, outcome["error"], RuntimeError)(outcome["message"])
            raise pynvml.NVMLError(outcome["value"])
        outs = [a for a in rest if hasattr(a, "_fields_")]
        for struct, recorded in zip(outs, outcome.get("out", []), strict=False):
            for field, value in recorded["fields"].items():
                if isinstance(value, list):
                    # pynvml versions differ in array lengths (clusterUuid: 16 here, 80 in
                    # the H100 recording's nvidia-ml-py 13.610); the shared prefix is replayed
                    array = getattr(struct, field)
                    size = min(len(array), len(value))
                    array[:size] = value[:size]
                else:
                    setattr(struct, field, value)
        return decode(outcome["result"])


def with_reading(
    recording: dict[str, Any], device: int | None, key: str, result: Any
) -> dict[str, Any]:
    """A copy of ``recording`` with one recorded call's result replaced (the key must exist)."""
    changed = copy.deepcopy(recording)
    book = changed["system"] if device is None else changed["devices"][device]
    if key not in book:
        raise NotRecorded(f"{key}: nothing recorded to change")
    book[key] = {"result": result}
    return changed


def with_error(
    recording: dict[str, Any], device: int | None, key: str, value: int
) -> dict[str, Any]:
    """A copy of ``recording`` where one recorded call raises NVML error ``value`` instead."""
    changed = copy.deepcopy(recording)
    book = changed["system"] if device is None else changed["devices"][device]
    if key not in book:
        raise NotRecorded(f"{key}: nothing recorded to change")
    error = pynvml.NVMLError(value)
    book[key] = {"error": type(error).__name__, "value": value, "message": str(error)}
    return changed


def sysfs_tree(root: Path, devices: dict[str, dict[str, str]]) -> Path:
    """A PCI sysfs folder (ADDRESS/vendor, /device, /class) with these devices, e.g. the
    ``sysfs_pci_nvidia`` a recording holds."""
    root.mkdir(parents=True, exist_ok=True)
    for address, attrs in devices.items():
        (root / address).mkdir(parents=True)
        for name, value in attrs.items():
            (root / address / name).write_text(value + "\n")
    return root
