"""A rolling reboot of the VM lab (tests/vm/test_rolling_reboot.py): gpunode's
``rolling_reboot``, one host at a time, as the NVIDIA driver role runs it, with the check and
the timeout the test gives in the environment:

    GPUNODE_VMTEST_CHECK      the shell command each host must pass after its reboot
    GPUNODE_VMTEST_TIMEOUT    seconds a host has to come back
    GPUNODE_VMTEST_SHUT_OUT   addresses (comma-separated) the controller then refuses new SSH
                              connections to, from just before the rolling reboot: a host
                              that reboots never answers again (the test lifts it after), with
                              the nftables table named in GPUNODE_VMTEST_SHUT_OUT_TABLE
"""

import os
import subprocess

from pyinfra.operations import python

from gpunode.operations.server import rolling_reboot

shut_out = [a for a in os.environ.get("GPUNODE_VMTEST_SHUT_OUT", "").split(",") if a]


def refuse_new_logins() -> None:
    # connections already open (pyinfra's own) go on; a host that reboots cannot come back
    ruleset = (
        f"table inet {os.environ['GPUNODE_VMTEST_SHUT_OUT_TABLE']} {{\n"
        "  chain output {\n"
        "    type filter hook output priority 0; policy accept;\n"
        f"    ip daddr {{ {', '.join(shut_out)} }} tcp dport 22 ct state new drop\n"
        "  }\n"
        "}\n"
    )
    subprocess.run(["nft", "-f", "-"], input=ruleset, text=True, check=True)


if shut_out:
    python.call(
        name="Refuse new SSH connections to the VMs", function=refuse_new_logins, _run_once=True
    )

rolling_reboot(
    name="Reboot one host at a time",
    check=os.environ["GPUNODE_VMTEST_CHECK"],
    reboot_timeout=int(os.environ["GPUNODE_VMTEST_TIMEOUT"]),
    _serial=True,
)
