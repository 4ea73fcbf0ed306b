"""Facts for the firewall and hardening roles: one cheap shell command each."""

from __future__ import annotations

from pyinfra.api import FactBase

from gpunode.hardening import (
    FIREWALL_ACTIVE,
    FIREWALL_LIVE_SHA,
    NFT_TABLE,
    ROLLBACK_UNIT,
    SSHD_DROPIN,
)


class FirewallState(FactBase):
    """
    Where gpunode's firewall stands on a host: the sha1 of the confirmed ruleset file,
    whether gpunode's table is loaded and still what was confirmed (the sha1 of its
    stateless listing, recorded at confirmation), and whether a rollback is armed.

    .. code:: python

        {"nft": True, "active_sha1": "3f2a...", "loaded": True, "live_matches": True,
         "rollback_armed": False}
    """

    def command(self) -> str:
        return (
            "command -v nft >/dev/null 2>&1 && echo nft=yes || echo nft=no; "
            f"echo active_sha1=$(sha1sum {FIREWALL_ACTIVE} 2>/dev/null | cut -d' ' -f1); "
            f"if live=$(nft -s list table inet {NFT_TABLE} 2>/dev/null); then echo loaded=yes; "
            'echo live_sha1=$(printf "%s\\n" "$live" | sha1sum | cut -d" " -f1); '
            "else echo loaded=no; fi; "
            f"echo recorded_sha1=$(cat {FIREWALL_LIVE_SHA} 2>/dev/null); "
            f"systemctl is-active --quiet {ROLLBACK_UNIT}.timer && echo armed=yes || echo armed=no"
        )

    def process(self, output: list[str]) -> dict[str, bool | str]:
        raw: dict[str, str] = {}
        for line in output:
            key, _, value = line.partition("=")
            raw[key.strip()] = value.strip()
        live = raw.get("live_sha1", "")
        return {
            "nft": raw.get("nft") == "yes",
            "active_sha1": raw.get("active_sha1", ""),
            "loaded": raw.get("loaded") == "yes",
            "live_matches": bool(live) and live == raw.get("recorded_sha1"),
            "rollback_armed": raw.get("armed") == "yes",
        }


class SshdState(FactBase):
    """
    gpunode's sshd drop-in and whether the main sshd_config includes the drop-in directory
    (sshd reads only the files an ``Include`` names).

    .. code:: python

        {"dropin_sha1": "9b1c...", "includes_dropins": True}
    """

    def command(self) -> str:
        return (
            f"echo dropin_sha1=$(sha1sum {SSHD_DROPIN} 2>/dev/null | cut -d' ' -f1); "
            "grep -qiE '^[[:space:]]*Include[[:space:]]+/etc/ssh/sshd_config\\.d/\\*\\.conf' "
            "/etc/ssh/sshd_config && echo include=yes || echo include=no"
        )

    def process(self, output: list[str]) -> dict[str, bool | str]:
        raw = dict(line.partition("=")[::2] for line in output)
        return {
            "dropin_sha1": raw.get("dropin_sha1", "").strip(),
            "includes_dropins": raw.get("include", "").strip() == "yes",
        }


class WritableSysctls(FactBase):
    """
    Which of the given sysctl keys this host can write (inside a container the kernel-wide
    ones under /proc/sys/kernel and /proc/sys/fs are read-only).

    .. code:: python

        {"kernel.sysrq": False, "net.ipv4.tcp_syncookies": True}
    """

    def command(self, keys: list[str]) -> str:
        checks = "; ".join(
            f"test -w /proc/sys/{key.replace('.', '/')} && echo {key}=yes || echo {key}=no"
            for key in keys
        )
        return checks or "true"

    def process(self, output: list[str]) -> dict[str, bool]:
        return {k: v == "yes" for k, _, v in (line.partition("=") for line in output) if k}
