"""gpunode.operations.server.rolling_reboot through pyinfra's own runner, on fake hosts that
boot: each reboot gives a host a new boot id after a few refused connections. What it must
do: one host at a time, each checked before the next reboots; a host that does not come back
or fails its check stops the rollout, and every host after it fails unrebooted, naming it.
(On real VMs: tests/vm/test_rolling_reboot.py.)"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from harness import RecordingFakeConnector, fake_clock
from paramiko import SSHException
from pyinfra.api import Config, Inventory, State
from pyinfra.api.connect import connect_all
from pyinfra.api.exceptions import ConnectError, OperationValueError, PyinfraError
from pyinfra.api.operation import add_op
from pyinfra.api.operations import run_ops
from pyinfra.connectors.util import CommandOutput, OutputLine

import gpunode.operations.server as server_ops
from gpunode.operations.server import BOOT_ID, rolling_reboot

CHECK = "gpunode-check-the-host"
HOSTS = ("gpu-01", "gpu-02", "gpu-03")


class BootingHost(RecordingFakeConnector):
    """A fake host that reboots: after the reboot command it refuses ``DOWN - 1``
    connections, then answers with a new boot id (``NEVER``: it never answers again).
    ``EVENTS`` is every host's reboots and checks, in the order they ran."""

    EVENTS: ClassVar[list[tuple[str, str]]] = []
    NEVER: ClassVar[set[str]] = set()  # hosts that do not come back
    BAD: ClassVar[set[str]] = set()  # hosts whose check fails
    DOWN = 3
    OLD_ANSWERS = 0  # connections that still reach the old boot, on its way down
    CUT = False  # the first connection after the reboot breaks under the boot id's command

    def __init__(self, state: Any, host: Any) -> None:
        super().__init__(state, host)
        self.boot, self.down, self.stale, self.cut = 1, 0, 0, False

    def connect(self) -> None:
        if self.stale:
            self.stale -= 1
            return
        if self.down:
            self.down -= 1
            if self.down == 0 and self.host.name.removeprefix("@fake/") not in self.NEVER:
                self.boot += 1  # up again, a new boot
            else:
                self.down = self.down or 1
                raise ConnectError("Connection refused")

    def run_shell_command(self, command, print_output=False, print_input=False, **arguments):
        text = str(command)
        name = self.host.name.removeprefix("@fake/")
        if text == BOOT_ID:
            self.executed_commands.append(text)
            if self.cut:
                self.cut = False
                raise SSHException("SSH session not active")
            return True, _output([f"boot-{name}-{self.boot}"])
        if "systemctl reboot" in text:
            self.EVENTS.append((name, "reboot"))
            self.down, self.stale, self.cut = self.DOWN, self.OLD_ANSWERS, self.CUT
        if text == CHECK:
            self.EVENTS.append((name, f"check in boot {self.boot}"))
            if name in self.BAD:
                self.executed_commands.append(text)
                return False, _output([], ["gpunode: the driver did not load"])
        return super().run_shell_command(command, print_output, print_input, **arguments)


def _output(stdout: list[str], stderr: list[str] | None = None) -> CommandOutput:
    lines = [OutputLine("stdout", line) for line in stdout]
    lines += [OutputLine("stderr", line) for line in stderr or []]
    return CommandOutput(lines)


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    BootingHost.EVENTS.clear()
    BootingHost.NEVER.clear()
    BootingHost.BAD.clear()
    return fake_clock(monkeypatch, server_ops)


def rollout(
    serial: bool = True, reboot_timeout: int = 600, hosts: tuple[str, ...] = HOSTS
) -> State:
    data = {"fake_delay": 0, "fake_delay_jitter": 0}
    inventory = Inventory(([(f"@fake/{name}", data) for name in hosts], {}))
    for each in inventory:
        each.connector_cls = BootingHost
    state = State(inventory, Config())
    connect_all(state)
    add_op(
        state,
        rolling_reboot,
        name="Reboot into the new driver",
        check=CHECK,
        reboot_timeout=reboot_timeout,
        _serial=serial,
    )
    try:
        run_ops(state)
    except PyinfraError:  # every host failed
        pass
    return state


def failed(state: State) -> list[str]:
    return sorted(host.name.removeprefix("@fake/") for host in state.failed_hosts)


def rebooted(events: list[tuple[str, str]]) -> list[str]:
    """The hosts in the order they were rebooted (pyinfra's active hosts are a set)."""
    return [name for name, event in events if event == "reboot"]


def assert_the_others_stopped_at(first: str, messages: list[str]) -> None:
    """Every host but ``first`` failed unrebooted, with a line naming ``first``."""
    for name in set(HOSTS) - {first}:
        assert any(
            f"[@fake/{name}]" in m
            and f"not rebooted: the rolling reboot stopped at @fake/{first}" in m
            for m in messages
        ), messages


def test_each_host_is_rebooted_and_checked_in_its_new_boot_before_the_next(
    clock: list[float],
) -> None:
    state = rollout()
    assert failed(state) == []
    order = rebooted(BootingHost.EVENTS)
    assert sorted(order) == list(HOSTS)
    assert BootingHost.EVENTS == [
        event for name in order for event in ((name, "reboot"), (name, "check in boot 2"))
    ]
    # each wait: the delay, then an attempt per interval: the DOWN-th connection gets in
    assert clock[0] == pytest.approx(3 * (10 + (BootingHost.DOWN - 1) * 5))


def test_a_host_whose_check_fails_stops_the_rollout_there(caplog: Any) -> None:
    BootingHost.BAD.update(HOSTS)  # the first host to reboot fails its check
    state = rollout()
    assert failed(state) == list(HOSTS)
    (first,) = rebooted(BootingHost.EVENTS)
    assert BootingHost.EVENTS == [(first, "reboot"), (first, "check in boot 2")]
    messages = [r.getMessage() for r in caplog.records]
    assert_the_others_stopped_at(first, messages)


def test_a_check_that_fails_after_others_passed_stops_only_the_hosts_after_it() -> None:
    BootingHost.BAD.add("gpu-02")
    state = rollout()
    order = rebooted(BootingHost.EVENTS)
    assert order[-1] == "gpu-02"  # nobody rebooted after it
    assert failed(state) == sorted({"gpu-02"} | (set(HOSTS) - set(order)))


def test_a_host_that_does_not_come_back_stops_the_rollout_naming_it(
    caplog: Any, clock: list[float]
) -> None:
    BootingHost.NEVER.update(HOSTS)  # the first host to reboot stays down
    state = rollout(reboot_timeout=120)
    assert failed(state) == list(HOSTS)
    (first,) = rebooted(BootingHost.EVENTS)
    assert BootingHost.EVENTS == [(first, "reboot")]  # no check, no other reboot
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        f"[@fake/{first}]" in m and "did not come back within 120 s of its reboot" in m
        for m in messages
    ), messages
    assert_the_others_stopped_at(first, messages)
    assert 120 <= clock[0] < 120 + 5 + 1  # gave up at the timeout, no later


def test_a_host_still_on_its_old_boot_is_not_taken_for_one_that_came_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(BootingHost, "OLD_ANSWERS", 2)
    state = rollout(hosts=("gpu-01",))
    assert failed(state) == []
    assert BootingHost.EVENTS == [("gpu-01", "reboot"), ("gpu-01", "check in boot 2")]


def test_a_connection_that_breaks_under_the_boot_id_is_tried_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(BootingHost, "OLD_ANSWERS", 1)
    monkeypatch.setattr(BootingHost, "CUT", True)
    state = rollout(hosts=("gpu-01",))
    assert failed(state) == []
    assert BootingHost.EVENTS == [("gpu-01", "reboot"), ("gpu-01", "check in boot 2")]


def test_without_serial_it_is_refused_before_any_host_is_touched() -> None:
    with pytest.raises(OperationValueError, match="one host at a time: pass _serial=True"):
        rollout(serial=False)
    assert BootingHost.EVENTS == []
