"""Building blocks shared by every section of gpunode's configuration schema.

Each concern keeps its own section model next to its code (``gpunode/nvidia.py``,
``gpunode/hardening.py``, ...); they all derive from :class:`Model` and use
these constrained types, so errors read the same everywhere.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, StringConstraints

USERNAME_RE = r"^[a-z_][a-z0-9_-]{0,31}$"
GROUPNAME_RE = r"^[a-z][a-z0-9_]{0,62}$"
HOSTNAME_RE = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
SIZE_RE = r"^[0-9]+[KMGT]?$"

PATTERN_HELP = {
    USERNAME_RE: "a POSIX user name: a-z, 0-9, '_' and '-', starting with a letter or '_', "
    "at most 32 characters",
    GROUPNAME_RE: "a-z, 0-9 and '_', starting with a letter (group names are Python names)",
    HOSTNAME_RE: "a hostname label: a-z, 0-9 and '-', at most 63 characters",
    SIZE_RE: "a size such as 512M or 2G",
}

UserName = Annotated[str, StringConstraints(pattern=USERNAME_RE)]
GroupName = Annotated[str, StringConstraints(pattern=GROUPNAME_RE)]
HostName = Annotated[str, StringConstraints(pattern=HOSTNAME_RE)]
PackageName = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9.+_:-]*$")]
HoldPattern = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9.+_*-]*$")]
NtpServer = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9.:-]*$")]
HttpUrl = Annotated[str, StringConstraints(pattern=r"^https?://[^\s\"';]+$")]


class ConfigError(Exception):
    """Bad configuration. ``str()`` is the complete, user-facing message."""


class Model(BaseModel):
    """A config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _strict_cidr(value: Any) -> Any:
    try:
        ipaddress.ip_network(str(value), strict=True)
    except ValueError as exc:
        raise ValueError(
            f"{value!r} is not a network in CIDR notation ({exc}; "
            "allowed: e.g. 10.0.0.0/24 or 2001:db8::/64, with no host bits set)"
        ) from None
    return value


Cidr = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_strict_cidr)]
