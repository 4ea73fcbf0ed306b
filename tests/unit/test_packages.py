"""apt_update (gpunode/operations/packages.py) under a real /bin/sh, with an ``apt-get`` on
PATH that answers as apt 2.6 does: the lists lock held by another process (the message
apt printed on a lab host whose lock a test held), another failure, success. The real apt
with a real lock held: tests/lab/test_base.py."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from gpunode.operations.packages import APT_LOCK_TIMEOUT_S, apt_update_command

LOCKED = (
    "E: Could not get lock /var/lib/apt/lists/lock. It is held by process 16826 (python3)\n"
    "E: Unable to lock directory /var/lib/apt/lists/"
)
BROKEN = (
    "E: The repository 'http://deb.example/debian bookworm Release' does not have a Release file."
)


def stand_in(tmp_path: Path, answers: list[tuple[int, str]]) -> Path:
    """An apt-get that gives ``answers`` in turn (the last one again once they run out) and
    logs each call with its LC_ALL."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for i, (rc, text) in enumerate(answers):
        (tmp_path / f"answer{i}").write_text(text)
        (tmp_path / f"rc{i}").write_text(str(rc))
    script = bin_dir / "apt-get"
    script.write_text(
        "#!/bin/sh\n"
        f'log={tmp_path}/calls; echo "$LC_ALL $*" >> "$log"\n'
        'n=$(($(wc -l < "$log") - 1)); '
        f"[ -f {tmp_path}/answer$n ] || n={len(answers) - 1}\n"
        f"cat {tmp_path}/answer$n; [ -s {tmp_path}/answer$n ] && echo\n"
        f"exit $(cat {tmp_path}/rc$n)\n"
    )
    script.chmod(0o755)
    return bin_dir


def update(tmp_path: Path, answers: list[tuple[int, str]], **kw: int):
    bin_dir = stand_in(tmp_path, answers)
    start = time.monotonic()
    done = subprocess.run(
        ["/bin/sh", "-c", apt_update_command(**kw)],
        capture_output=True,
        text=True,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "LC_ALL": "de_DE.UTF-8"},
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    calls = (tmp_path / "calls").read_text().splitlines()
    return done, calls, time.monotonic() - start


def test_a_free_apt_updates_once(tmp_path: Path) -> None:
    done, calls, _ = update(
        tmp_path, [(0, "Hit:1 http://deb.debian.org/debian bookworm InRelease")]
    )
    assert (done.returncode, done.stdout, done.stderr) == (
        0,
        "Hit:1 http://deb.debian.org/debian bookworm InRelease\n",
        "",
    )
    assert calls == ["C update"]  # apt's messages in English, to be matched


def test_a_held_lock_is_waited_for(tmp_path: Path) -> None:
    done, calls, _ = update(
        tmp_path, [(100, LOCKED), (100, LOCKED), (0, "Reading package lists...")], retry_s=0
    )
    assert done.returncode == 0, done.stderr
    assert calls == ["C update"] * 3
    assert done.stdout == "Reading package lists...\n"
    assert done.stderr.count("another apt process holds its lock") == 2


def test_any_other_failure_fails_at_once(tmp_path: Path) -> None:
    done, calls, _ = update(tmp_path, [(100, BROKEN), (0, "")], retry_s=0)
    assert (done.returncode, calls) == (100, ["C update"])
    assert done.stderr == BROKEN + "\n"


def test_a_lock_held_for_longer_than_the_wait_fails_with_apts_words(tmp_path: Path) -> None:
    done, calls, took = update(tmp_path, [(100, LOCKED)], wait_s=2, retry_s=1)
    assert done.returncode == 100
    assert done.stderr.endswith(LOCKED + "\n")
    assert 2 <= len(calls) <= 4 and 1.5 < took < 10


def test_the_wait_is_as_long_as_apts_own_for_dpkg() -> None:
    assert f"+ {APT_LOCK_TIMEOUT_S} ))" in apt_update_command()
    assert "sleep 5;" in apt_update_command()


@pytest.mark.parametrize("wait, retry", [(0, 0), (1, 2)])
def test_no_retry_once_the_time_is_up(tmp_path: Path, wait: int, retry: int) -> None:
    done, calls, _ = update(tmp_path, [(100, LOCKED)], wait_s=wait, retry_s=retry)
    assert done.returncode == 100 and len(calls) <= 2
