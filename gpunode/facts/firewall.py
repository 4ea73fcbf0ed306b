"""Facts for the firewall role: one cheap shell command each."""

from __future__ import annotations

from pyinfra.api import FactBase

from gpunode.firewall import FIREWALL_ACTIVE, FIREWALL_LIVE_SHA, NFT_TABLE, ROLLBACK_UNIT


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
