"""Operations on ini files, key by key, through the parser in gpunode/facts/ini.py."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import operation

from gpunode.facts.ini import IniValues, ini_command
from gpunode.render import ini_value as rendered


@operation()
def ini_value(path: str, section: str, key: str, value: str | None):
    """
    Set one key in one section of an ini file to one value (``None``: remove the key), leaving
    every other line as it was. A key found more than once in the section is written once.
    The file is replaced atomically with its owner and mode kept; nothing is written when the
    key already has exactly this value. A value the format cannot hold (a control character
    would start a new key) raises ``ConfigError`` before anything runs
    (``gpunode.render.ini_value``; config load checks inventory values with it already).

    .. code:: python

        ini_value(name="dnf proxy", path="/etc/dnf/dnf.conf", section="main",
                  key="proxy", value="http://proxy.example.com:3128")
    """
    if value is not None:
        value = rendered(value, f"{path} [{section}] {key}")  # refuses what would add a key
    current = host.get_fact(IniValues, path=path, section=section, key=key)
    wanted = [] if value is None else [value]
    if (current or {}).get("values", []) == wanted:
        host.noop(f"{key} in [{section}] of {path} is as wanted")
        return
    if value is None:
        yield ini_command("unset", path, section, key)
    else:
        yield ini_command("set", path, section, key, value)
