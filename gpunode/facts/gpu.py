"""The node's GPUs as the probe (``gpunode-probe``, gpunode/probe.py) reports them."""

from __future__ import annotations

import json
from typing import Any

from pyinfra.api import FactBase

from gpunode import probe


class GpuProbe(FactBase):
    """
    The node's GPUs and their health: the JSON report of ``gpunode-probe`` (one command
    per host; gpunode/probe.py documents the schema and exit codes). Before the probe is
    installed: status ``not_installed`` and the NVIDIA GPUs on the PCI bus.

    .. code:: python

        {"status": "healthy", "exit_code": 0, "gpu_count": 1, "driver_version": "580.95.05",
         "gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", ...}], ...}
        {"status": "no_gpu", "exit_code": 2, "gpu_count": 0, "gpus": [], "pci_gpus": [], ...}
        {"status": "not_installed", "exit_code": None, "pci_gpus": ["0000:01:00.0"], ...}
    """

    def command(self) -> str:
        return probe.FACT_COMMAND.format(probe=probe.PROBE_PATH)

    def process(self, output: list[str]) -> dict[str, Any]:
        return parse_probe_output(output)


def parse_probe_output(output: list[str]) -> dict[str, Any]:
    """The fact's output lines -> a probe report.

    A probe that prints no JSON (python3 missing, a crash) gives status ``probe_failed``
    and its exit code, so callers never mistake it for a GPU-less host."""
    lines = [line for line in output if line.strip()]
    exit_line = lines[-1] if lines else ""
    _, sep, code = exit_line.partition("gpunode-probe-exit=")
    if not sep:
        raise ValueError(f"gpunode-probe fact: unexpected output {output!r}")
    if code == "not-installed":
        pci = [line.partition("=")[2] for line in lines if line.startswith("pci-gpu=")]
        return {**probe.empty_report(), "status": "not_installed", "pci_gpus": pci}
    body = "\n".join(lines[:-1])
    try:
        report: dict[str, Any] = json.loads(body)
    except ValueError:
        report = {
            **probe.empty_report(),
            "status": "probe_failed",
            "error": f"gpunode-probe printed no JSON: {body[-500:]!r}",
        }
    report["exit_code"] = int(code)
    return report
