"""A converged VM stays converged: a second deploy changes nothing on any VM."""

from __future__ import annotations

import time

from .conftest import DEPLOY, INVENTORY, VmLab, changes, figure, pyinfra_sudo


def test_a_second_deploy_changes_nothing_on_any_vm(converged: VmLab) -> None:
    started = time.monotonic()
    done = pyinfra_sudo(INVENTORY, DEPLOY)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert changes(out) == (0, 0), out[-6000:]
    figure("second deploy of every VM (full plan, seal off)", time.monotonic() - started)
