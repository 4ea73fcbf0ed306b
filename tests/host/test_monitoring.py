"""Checks for roles/monitoring.py and roles/provenance.py."""

from __future__ import annotations

import json
import re

import pytest

from gpunode.facts.nvidia import NvidiaHost
from gpunode.monitoring import DCGM_EXPORTER_SERVICE, NODE_EXPORTER
from gpunode.provenance import PATH as PROVENANCE
from gpunode.schema import distros
from gpunode.schema.node import Host


def test_textfile_directory(host, node: Host) -> None:
    textfile = host.file(node.config.monitoring.textfile_dir)
    assert textfile.is_directory
    assert (textfile.user, textfile.group, textfile.mode) == ("root", "root", 0o755)


def test_node_exporter_serves_the_textfile_collector(
    host, node: Host, spec: distros.DistroSpec
) -> None:
    mon = node.config.monitoring
    exporter = NODE_EXPORTER.get(spec.family)
    if not mon.node_exporter or exporter is None:
        pytest.skip("node_exporter not managed on this host")
    service = host.service(exporter.service)
    assert service.is_enabled and service.is_running
    flags = host.file(exporter.defaults_file).content_string
    assert f"--collector.textfile.directory={mon.textfile_dir}" in flags
    metrics = host.check_output(f"curl -sf http://127.0.0.1:{mon.node_exporter_port}/metrics")
    # the textfile collector runs and reads the directory without error
    assert re.search(r"^node_textfile_scrape_error 0$", metrics, re.M)


def test_dcgm_exporter_on_gpu_nodes(host, node: Host) -> None:
    mon = node.config.monitoring
    fact = NvidiaHost()
    gpus = len(fact.process(host.run(fact.command()).stdout.splitlines())["gpus"])
    wanted = mon.dcgm_exporter if mon.dcgm_exporter is not None else gpus > 0
    service = host.service(DCGM_EXPORTER_SERVICE)
    if not wanted:
        assert not service.is_running
        return
    assert service.is_enabled and service.is_running
    assert (
        host.socket(f"tcp://0.0.0.0:{mon.dcgm_exporter_port}").is_listening
        or host.socket(f"tcp://:::{mon.dcgm_exporter_port}").is_listening
    )


def test_provenance_record(host) -> None:
    record = host.file(PROVENANCE)
    assert record.exists, f"{PROVENANCE} missing: the provenance role did not run"
    assert (record.user, record.group, record.mode) == ("root", "root", 0o644)
    doc = json.loads(record.content_string)
    assert set(doc) >= {"gpunode_version", "repository", "recorded", "deployed_at"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", doc["deployed_at"])
    assert set(doc["repository"]) == {"commit", "dirty"}
