"""A runtime profile's command line for one service (the profiles are in
gpunode/schema/runtimes.py)."""

from __future__ import annotations

import string
from collections.abc import Mapping

from gpunode.schema.runtimes import Profile


def command_line(profile: Profile, values: Mapping[str, object]) -> list[str]:
    """The server's arguments (after the executable) for these values.

    >>> command_line(PROFILES["llamacpp"], {"model": "/m", "listen": "0.0.0.0", "port": 8080})
    ['-m', '/m', '--host', '0.0.0.0', '--port', '8080', '--metrics']
    """
    argv: list[str] = []
    for arg in profile.args:
        needed = [name for token in arg.tokens for name in _placeholders(token)]
        if any(values.get(name) is None for name in needed):
            continue
        argv += [token.format(**{n: values[n] for n in needed}) for token in arg.tokens]
    return argv


def _placeholders(token: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(token) if name]
