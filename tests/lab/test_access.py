"""Who gets in and what sudo does, on real lab hosts (issue 13, finding 15).

The base and hardening roles (tests/lab/hardening_deploy.py) on fresh lab hosts, then:

- sudo runs each command in a pseudo-terminal of its own (``use_pty``: ``tty`` under sudo
  prints another /dev/pts device than the SSH session's own) and logs it to
  /var/log/sudo.log (the line with the admin user and the exact command is found);
- the real sshd refuses a user outside ``AllowGroups`` whose key is authorized, and lets the
  same user in once it is in the admin group (so it is AllowGroups that refused it);
- a sudoers drop-in that ``visudo`` refuses never takes effect: the operation fails with the
  reason, the drop-in that was there stays byte for byte, nothing staged is left, sudo works;
- a second run changes nothing.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from .conftest import Lab, planned_changes, pyinfra, run

INVENTORY = "inventories/lab.py"
DEPLOY = "tests/lab/hardening_deploy.py"
ADMIN = "labadmin"  # the lab's admin user, in base.admin_group (gpunode_admins)


@pytest.fixture(scope="module")
def deployed(lab: Lab) -> dict[str, str]:
    pyinfra(INVENTORY, DEPLOY, env=lab.env, check=True)
    return lab.env


def ssh_as(lab: Lab, user: str, command: str, tty: bool = False) -> tuple[int, str, str]:
    force_tty = ["-tt"] if tty else []
    proc = run(
        ["ssh", "-F", str(lab.state_dir / "ssh_config"), *force_tty, "-l", user, "lab-01", command],
        timeout=60,
    )
    return proc.returncode, proc.stdout.replace("\r\n", "\n"), proc.stderr


def test_second_run_changes_nothing(lab: Lab, deployed: dict[str, str]) -> None:
    assert planned_changes(INVENTORY, DEPLOY, deployed) == {}


def test_sudo_uses_a_pty_and_logs_every_command(lab: Lab, deployed: dict[str, str]) -> None:
    # sudo 1.9.13 (Debian 12) uses a pty only when it runs in a terminal: log in with one
    rc, out, err = ssh_as(lab, ADMIN, "tty; sudo -n tty", tty=True)
    assert rc == 0, out + err
    outside, inside = out.split()
    assert outside.startswith("/dev/pts/") and inside.startswith("/dev/pts/")
    assert inside != outside  # the command got a pseudo-terminal of its own (use_pty)

    marker = f"gpunode-{secrets.token_hex(6)}"
    rc, _, err = ssh_as(lab, ADMIN, f"sudo -n /usr/bin/echo {marker}")
    assert rc == 0, err
    log = lab.ssh("lab-01", f"grep -F {marker} /var/log/sudo.log", check=True).stdout
    (line,) = log.splitlines()
    assert f" : {ADMIN} : " in line and "USER=root" in line
    assert line.endswith(f"COMMAND=/usr/bin/echo {marker}")
    mode = lab.ssh("lab-01", "stat -c '%U %a' /var/log/sudo.log", check=True).stdout.split()
    assert mode[0] == "root" and int(mode[1], 8) & 0o007 == 0  # not readable by others


def test_sshd_refuses_a_user_outside_allow_groups(lab: Lab, deployed: dict[str, str]) -> None:
    effective = lab.ssh("lab-01", "sshd -T | grep '^allowgroups '", check=True).stdout
    assert sorted(effective.split()[1::2]) == ["gpunode_admins", "root"]
    # a user whose key is authorized (the lab key, as root's), in no allowed group
    lab.ssh(
        "lab-01",
        "id outsider >/dev/null 2>&1 || useradd -m -s /bin/sh outsider; "
        "install -d -m 700 -o outsider -g outsider /home/outsider/.ssh; "
        "install -m 600 -o outsider -g outsider /root/.ssh/authorized_keys "
        "/home/outsider/.ssh/authorized_keys",
        check=True,
    )
    try:
        rc, _, err = ssh_as(lab, "outsider", "true")
        assert rc == 255 and "Permission denied" in err
        journal = lab.ssh("lab-01", "journalctl -q --no-pager -u ssh -n 50", check=True).stdout
        assert "User outsider from" in journal
        assert "not allowed because none of user's groups are listed in AllowGroups" in journal
        # the same user and key get in once in the admin group: AllowGroups was the reason
        lab.ssh("lab-01", "gpasswd -a outsider gpunode_admins", check=True)
        rc, out, err = ssh_as(lab, "outsider", "id -un")
        assert rc == 0 and out.strip() == "outsider", err
        # and gpunode's own way in (root, the connection user) and the admin's still work
        assert lab.ssh("lab-01", "id -un", check=True).stdout.strip() == "root"
        assert ssh_as(lab, ADMIN, "id -un")[1].strip() == ADMIN
    finally:
        lab.ssh("lab-01", "userdel -r outsider")


DROPIN = "/etc/sudoers.d/50-gpunode-test"


def dropin_deploy(tmp: Path, content: str) -> Path:
    """A deploy that writes one sudoers drop-in through gpunode's operation."""
    path = tmp / f"sudoers_{secrets.token_hex(4)}.py"
    path.write_text(
        "from gpunode.operations.sudo import sudoers_dropin\n"
        f"sudoers_dropin(name='test drop-in', path={DROPIN!r}, content={content!r})\n"
    )
    return path


def test_a_sudoers_dropin_visudo_refuses_never_takes_effect(
    lab: Lab, deployed: dict[str, str], tmp_path: Path
) -> None:
    good = dropin_deploy(tmp_path, f"Defaults:{ADMIN} !lecture\n")
    bad = dropin_deploy(tmp_path, f"{ADMIN} ALL=(ALL) NOPASSWD ALL\n")  # no ':' after NOPASSWD
    limit = ["--limit", "lab-01"]
    try:
        pyinfra(INVENTORY, str(good), *limit, env=deployed, check=True)
        before = lab.ssh("lab-01", f"sha256sum {DROPIN}", check=True).stdout

        proc = pyinfra(INVENTORY, str(bad), *limit, env=deployed)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1
        assert "syntax error" in out  # visudo's own reason
        assert f"gpunode: visudo refused the new {DROPIN}: it was not put in place" in out

        assert lab.ssh("lab-01", f"sha256sum {DROPIN}", check=True).stdout == before
        left = lab.ssh("lab-01", "ls -A /etc/sudoers.d", check=True).stdout.split()
        assert not [name for name in left if "gpunode-new" in name or "gpunode-previous" in name]
        assert lab.ssh("lab-01", "visudo -c -q").returncode == 0
        rc, out, err = ssh_as(lab, ADMIN, "sudo -n id -u")
        assert rc == 0 and out.strip() == "0", err
    finally:
        lab.ssh("lab-01", f"rm -f {DROPIN}")
