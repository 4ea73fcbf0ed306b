"""``notice``: a skip the user should see is in the output of a plain ``pyinfra`` run (no
``-v``), once, whether pyinfra plans before it runs (change detection), only runs (``-y``) or only
plans (``--dry``). Run through pyinfra's own CLI on ``@local``; the operation runs no command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

MESSAGE = "no NVIDIA GPU found: installing anyway (nvidia.install: always)"
DEPLOY = f"""
from gpunode.operations.server import notice
notice(name="GPU stack", message={MESSAGE!r})
"""


@pytest.mark.parametrize("flags", [["-y"], ["--dry"], []], ids=["yes", "dry", "plan-then-run"])
def test_a_notice_is_shown_once_at_the_default_verbosity(tmp_path: Path, flags: list[str]) -> None:
    (tmp_path / "deploy.py").write_text(DEPLOY, encoding="utf-8")
    run = subprocess.run(
        [sys.executable, "-m", "pyinfra", *flags, "@local", "deploy.py"],
        cwd=tmp_path,
        input="\n",  # pyinfra's "Press enter to execute" after its plan
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    shown = [line.strip() for line in out.splitlines() if MESSAGE in line]
    assert shown == [f"[@local] {MESSAGE}"], out
