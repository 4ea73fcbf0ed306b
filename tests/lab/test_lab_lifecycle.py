"""`gpunode lab up/status/down` on a small lab of its own: keeps healthy hosts, rebuilds a dead
one, and `down` leaves no process, mount, namespace, link or state behind."""

from __future__ import annotations

import os
import signal
import time

from gpunode.commands.lab import LabSettings, LabState, leftovers

from .conftest import gpunode, lab_env, require_root

ENV = lab_env("life", 3)


def _settings() -> LabSettings:
    old = dict(os.environ)
    os.environ.update(ENV)
    try:
        return LabSettings.from_env()
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_up_keeps_healthy_hosts_rebuilds_dead_ones_and_down_leaves_nothing() -> None:
    require_root()
    settings = _settings()
    gpunode("lab", "down", env=ENV)
    try:
        gpunode("lab", "up", "--hosts", "1", env=ENV, check=True)
        first = LabState.read(settings.state_dir)
        assert first and list(first.hosts) == ["lab-01"]

        again = gpunode("lab", "up", "--hosts", "1", env=ENV, check=True)
        assert "1 kept, 0 booted" in again.stderr
        kept = LabState.read(settings.state_dir)
        assert kept and kept.hosts["lab-01"].pid == first.hosts["lab-01"].pid

        os.kill(first.hosts["lab-01"].pid, signal.SIGKILL)
        time.sleep(0.5)
        status = gpunode("lab", "status", env=ENV)
        assert status.returncode == 1 and "DOWN" in status.stdout

        rebuilt = gpunode("lab", "up", "--hosts", "1", env=ENV, check=True)
        assert "0 kept, 1 booted" in rebuilt.stderr
        assert gpunode("lab", "status", env=ENV).returncode == 0
        assert leftovers(settings) != []  # the check sees a running lab
    finally:
        down = gpunode("lab", "down", env=ENV)
    assert down.returncode == 0, down.stderr
    assert leftovers(settings) == []
    assert gpunode("lab", "down", env=ENV).returncode == 0  # twice is fine
