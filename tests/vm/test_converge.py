"""A converged VM stays converged: a second deploy changes nothing on any VM, and with the
drift seal on, a converged VM costs one command (the VMs log in as `vagrant` with sudo,
which the nspawn lab's root logins never do)."""

from __future__ import annotations

import re
import time

from gpunode.facts.seal import SEAL_SWITCH

from .conftest import DEPLOY, INVENTORY, VmLab, changes, figure, pyinfra_sudo


def test_a_second_deploy_changes_nothing_on_any_vm(converged: VmLab) -> None:
    started = time.monotonic()
    done = pyinfra_sudo(INVENTORY, DEPLOY)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    # the seal included: the first deploy installs pam_tmpdir, which changes where uploads
    # are staged, and that must not make the next run write the seal again
    assert changes(out) == (0, 0), out[-6000:]
    figure("second deploy of every VM (full plan, seal off)", time.monotonic() - started)


def test_with_the_seal_on_a_converged_vm_is_planned_in_one_command(converged: VmLab) -> None:
    """The seal is judged before the deploy sets its upload staging directory and recorded
    after: with sudo, a staging directory in the seal's inputs meant it never held."""
    done = pyinfra_sudo(INVENTORY, DEPLOY, env={SEAL_SWITCH: "0"})  # the seal up to date
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    started = time.monotonic()
    done = pyinfra_sudo(INVENTORY, DEPLOY, env={SEAL_SWITCH: "1"})
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert changes(out) == (0, 0), out[-6000:]
    for name in converged.hosts:
        assert re.search(rf"\[{re.escape(name)}\] converged: its seal holds \(\d+ checks\)", out), (
            out[-6000:]
        )
    assert "Base packages" not in out, out[-6000:]  # nothing else was planned
    figure("deploy of every VM with the seal on (converged)", time.monotonic() - started)
