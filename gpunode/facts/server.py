"""gpunode's pyinfra facts: one cheap shell command each."""

from __future__ import annotations

from pyinfra.api import FactBase


class HostInfo(FactBase):
    """
    What gpunode needs to know about a host before it plans anything: the distro
    (os-release ID and VERSION_ID) and whether it runs in a container (where the
    clock, kernel sysctls and modules belong to the machine underneath).

    .. code:: python

        {"id": "debian", "version_id": "12", "container": "systemd-nspawn"}
        # container is "" on bare metal and VMs
    """

    def command(self) -> str:
        return (
            ". /etc/os-release 2>/dev/null; "
            'echo "id=$ID"; echo "version_id=$VERSION_ID"; '
            'echo "container=$(systemd-detect-virt --container 2>/dev/null)"'
        )

    def process(self, output: list[str]) -> dict[str, str]:
        info = {"id": "", "version_id": "", "container": ""}
        for line in output:
            key, sep, value = line.partition("=")
            if sep and key in info:
                info[key] = value.strip().strip('"')
        if info["container"] == "none":
            info["container"] = ""
        return info
