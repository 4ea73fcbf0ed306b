"""Where uploads are staged when the login is not root (`pyinfra --sudo`, the Vagrant lab's
`vagrant` login, a cloud image's default user).

pyinfra uploads as the login into a temporary directory, then copies with sudo. It looks that
directory up under sudo; with pam_tmpdir (the hardening role installs it) sudo's session has
root's private /tmp/user/0, which the login cannot write: on the Vagrant lab's VMs every upload
after the first run failed with "Permission denied". gpunode stages them in the login's own
directory (gpunode/operations/server.py, stage_uploads_as_login)."""

from __future__ import annotations

import io
from typing import Any

import pytest
from harness import RecordingFakeConnector, run_deploys
from pyinfra import host
from pyinfra.api import deploy, operation
from pyinfra.api.command import StringCommand
from pyinfra.api.exceptions import DeployError
from pyinfra.connectors.util import CommandOutput, OutputLine
from pyinfra.facts.server import TmpDir
from pyinfra.operations import files

from gpunode import seal as sealing
from gpunode.inventory import node_and_distro
from gpunode.operations.files import upload
from gpunode.operations.server import stage_uploads_as_login
from gpunode.schema.node import NodeConfig

LOGIN_TMP, ROOT_TMP = "/tmp/user/1000", "/tmp/user/0"


class PamTmpdirHost(RecordingFakeConnector):
    """A host with pam_tmpdir: TMPDIR is the login's own, or root's under sudo."""

    def run_shell_command(self, command, print_output=False, print_input=False, **arguments):
        text = command if isinstance(command, str) else command.get_raw_value()
        if text == TmpDir().command():
            self.executed_commands.append(f"{'sudo ' if arguments.get('_sudo') else ''}{text}")
            return True, _output(ROOT_TMP if arguments.get("_sudo") else LOGIN_TMP)
        return super().run_shell_command(command, print_output, print_input, **arguments)


def _output(line: str) -> CommandOutput:
    return CommandOutput([OutputLine("stdout", line)])


@operation()
def _staged_upload():
    yield upload(io.BytesIO(b"seal spec\n"), "/var/lib/gpunode/.seal-spec.json")
    yield StringCommand("true")


@deploy("uploads")
def _role() -> None:
    node_and_distro(host)  # what every role does first
    files.put(name="A template", src=io.StringIO("x = 1\n"), dest="/etc/gpunode/x.conf")
    _staged_upload(name="A gpunode upload")


def _uploads() -> None:
    """A deploy file: the staging directory first, then the role."""
    stage_uploads_as_login()
    _role()


def run(host_data: dict[str, Any]) -> RecordingFakeConnector:
    connectors: list[RecordingFakeConnector] = []

    class Recording(PamTmpdirHost):
        def __init__(self, state, host) -> None:
            super().__init__(state, host)
            connectors.append(self)

    result = run_deploys(
        NodeConfig(distro="debian12"), {}, [_uploads], connector_cls=Recording, host_data=host_data
    )
    assert not result.failed
    [connector] = connectors
    return connector


def test_with_sudo_uploads_are_staged_in_the_logins_own_directory() -> None:
    connector = run({"_sudo": True})
    staged = dict(connector.upload_temps)
    assert set(staged) == {"/etc/gpunode/x.conf", "/var/lib/gpunode/.seal-spec.json"}
    for dest, temp in staged.items():
        assert temp is not None and temp.startswith(f"{LOGIN_TMP}/pyinfra-"), (dest, temp)
    # read once, as the login (not under sudo)
    reads = [c for c in connector.executed_commands if c.endswith(TmpDir().command())]
    assert reads == [TmpDir().command()]


def test_without_sudo_pyinfra_stages_them_as_it_always_does() -> None:
    connector = run({})
    staged = dict(connector.upload_temps)
    # gpunode sets nothing: its own upload names no staging file (the upload goes straight
    # to its place as the login), and pyinfra's files.put looks the directory up itself
    assert staged["/var/lib/gpunode/.seal-spec.json"] is None
    assert "/etc/gpunode/x.conf" in staged


def test_a_temp_dir_the_inventory_sets_is_kept() -> None:
    connector = run({"_sudo": True, "_temp_dir": "/var/tmp/ops"})
    for dest, temp in connector.upload_temps:
        assert temp is not None and temp.startswith("/var/tmp/ops/pyinfra-"), (dest, temp)
    assert not [c for c in connector.executed_commands if c.endswith(TmpDir().command())]


def test_a_role_run_with_sudo_without_the_staging_directory_stops_saying_what_to_do() -> None:
    with pytest.raises(DeployError) as err:
        run_deploys(
            NodeConfig(distro="debian12"), {}, [_role], connector_cls=PamTmpdirHost,
            host_data={"_sudo": True},
        )  # fmt: skip
    assert str(err.value) == (
        "host @fake/gpu-01: uploads with sudo need a staging directory the login can write "
        "(allowed: call gpunode.operations.server.stage_uploads_as_login() at the top of the "
        "deploy file, before any role, as deploys/gpu_node.py does; or set TEMP_DIR)"
    )


def _seal_inputs(login_tmp: str) -> str:
    """The seal's input digest of a sudo host whose login's TMPDIR is ``login_tmp``, as the
    seal records it (after the staging directory is set); the same as deploys/gpu_node.py
    judges it (before)."""
    digests: list[str] = []

    class Login(PamTmpdirHost):
        def run_shell_command(self, command, print_output=False, print_input=False, **kw):
            text = command if isinstance(command, str) else command.get_raw_value()
            if text == TmpDir().command() and not kw.get("_sudo"):
                return True, _output(login_tmp)
            return super().run_shell_command(command, print_output, print_input, **kw)

    def _digest() -> None:
        digests.append(sealing.input_digest(host))  # judged, as deploys/gpu_node.py does
        stage_uploads_as_login()
        assert host.data.get("_temp_dir") == login_tmp
        digests.append(sealing.input_digest(host))  # recorded, as the seal operation does

    result = run_deploys(
        NodeConfig(distro="debian12"), {}, [_digest], connector_cls=Login,
        host_data={"_sudo": True},
    )  # fmt: skip
    assert not result.failed
    judged, recorded = digests
    assert recorded == judged
    return recorded


def test_the_seals_inputs_are_the_same_whichever_directory_the_login_stages_in() -> None:
    """The first deploy installs pam_tmpdir: the login's TMPDIR is /tmp in its run and
    /tmp/user/<uid> in every run after. The staging directory decides no operation's change,
    so it is no input of the seal. Found on the VMs: the second deploy wrote each VM's seal
    again (1 change a host on a converged host), and the seal, judged before the directory is
    set and recorded after, never held for a login with sudo (every run the full plan)."""
    assert _seal_inputs("/tmp") == _seal_inputs(LOGIN_TMP)
