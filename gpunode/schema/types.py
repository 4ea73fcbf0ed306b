"""Every constrained type of gpunode's configuration schema, defined once.

Each section module (``gpunode/schema/<key>.py``) builds its models from these,
so a value means the same thing, and an error reads the same, in every section.
A regular expression here has its human wording in :data:`PATTERN_HELP`; the
loader (``gpunode/config.py``) prints that wording instead of the expression.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator, Mapping
from types import UnionType
from typing import Annotated, Any, ClassVar, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
)


class ConfigError(Exception):
    """Bad configuration. ``str()`` is the complete, user-facing message."""


class Model(BaseModel):
    """A config section: unknown keys are errors, values are immutable, and no string in it
    (a value, a list item, a mapping key) holds a control character."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    # Fields that hold raw node config layers (validated as NodeConfig on their own, where
    # errors name the exact key): not scanned here.
    RAW_LAYERS: ClassVar[frozenset[str]] = frozenset()

    @field_validator("*", mode="before")
    @classmethod
    def _printable(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name in cls.RAW_LAYERS or _is_section(cls, info.field_name):
            return value
        for text in _strings(value):
            bad = _CONTROL.search(text)
            if bad:
                raise ValueError(
                    f"{text[:40]!r} holds the control character {bad.group()!r} (allowed: "
                    "printable text: no newline, tab, NUL, escape or other control character)"
                )
        return value


# C0 and C1 control characters, DEL, and the Unicode line and paragraph separators: a consumer
# (a shell, an ssh_config, an ini file, a log line) may read any of them as a line break.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _is_section(model: type[BaseModel], field: str | None) -> bool:
    """The field holds a nested section (a model, or None): that model checks its own."""
    annotation = model.model_fields[field].annotation if field else None
    options = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else ()
    return any(
        isinstance(option, type) and issubclass(option, BaseModel)
        for option in (annotation, *options)
    )


def _strings(value: Any) -> Iterator[str]:
    """The strings a field holds itself: the value, its list items, its mapping keys and
    values. A nested mapping is a nested section: its own model checks it (and names it)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(key)
            if isinstance(item, (str, list, tuple)):
                yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        yield from (item for item in value if isinstance(item, str))


# --- patterns -------------------------------------------------------------------------------

USERNAME_RE = r"^[a-z_][a-z0-9_-]{0,31}$"
GROUPNAME_RE = r"^[a-z][a-z0-9_]{0,62}$"
HOSTNAME_RE = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
SIZE_RE = r"^[0-9]+[KMGT]?$"
SHA256_RE = r"^[0-9a-f]{64}$"
# Absolute paths: letters, digits and . _ - + @ : , = only, no empty, "." or ".." segment
# (checked by _plain_segments), no trailing slash.
ABS_PATH_RE = r"^(/[A-Za-z0-9._+@:,=-]+)+$"
# Relative paths inside a directory: the same characters, no leading slash, no "..".
REL_PATH_RE = r"^[A-Za-z0-9_-][A-Za-z0-9._/-]*$"
SERVICE_NAME_RE = r"^[a-z][a-z0-9-]{0,22}$"
SECRET_NAME_RE = r"^[a-z0-9][a-z0-9_-]{0,62}$"  # noqa: S105 - a pattern
# http(s) from a mirror, or file:// on a local mirror or NFS mount. No user:password@ (it
# would be printed with the command): mirrors that need credentials use ~/.netrc.
URI_RE = r"^(https?://[A-Za-z0-9.-]+(:[0-9]+)?|file://)/[A-Za-z0-9._~%+/=,-]*$"
HTTP_URL_RE = r"^https?://[^\s\"';\\]+$"
GPU_UUID_RE = r"^(GPU|MIG)-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
PIN_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?==[A-Za-z0-9.+!_-]+$"
ARG_RE = r"^[A-Za-z0-9._/=:,+@-]+$"  # command-line arguments: no shell or systemd specials
VERSION_RE = r"^[0-9]+\.[0-9]+\.[0-9]+$"
NAME_RE = r"^[a-z0-9]([a-z0-9_-]{0,62})$"
# Go durations (Nomad): 30s, 5m, 1h30m
DURATION_RE = r"^([0-9]+(ns|us|ms|s|m|h))+$"
# systemd time spans (RandomizedDelaySec=, journald's MaxRetentionSec=)
SPAN_RE = r"^[0-9]+(us|ms|s|min|h|d)?$"
RETENTION_RE = r"^[0-9]+(s|min|h|day|week|month|year)$"

PATTERN_HELP: dict[str, str] = {
    USERNAME_RE: "a POSIX user name: a-z, 0-9, '_' and '-', starting with a letter or '_', "
    "at most 32 characters",
    GROUPNAME_RE: "a-z, 0-9 and '_', starting with a letter (group names are Python names)",
    HOSTNAME_RE: "a hostname label: a-z, 0-9 and '-', at most 63 characters",
    SIZE_RE: "a size such as 512M or 2G",
    SHA256_RE: "64 lowercase hex digits, as sha256sum prints them",
    ABS_PATH_RE: "an absolute path: '/' then letters, digits and . _ - + @ : , = "
    "(no spaces, quotes, shell characters or trailing '/')",
    REL_PATH_RE: "a relative path: letters, digits, '.', '_', '-', '/'",
    SERVICE_NAME_RE: "a-z, 0-9 and '-', starting with a letter, at most 23 characters",
    URI_RE: "http(s)://host[:port]/path or file:///path, with no user:password@",
    HTTP_URL_RE: "an http:// or https:// URL with no spaces, quotes, ';' or backslash",
    GPU_UUID_RE: "a GPU or MIG UUID as nvidia-smi -L prints it, e.g. "
    "GPU-9221d5d1-b60b-a624-bf14-0a1819cfda3b",
    PIN_RE: "an exact pin name==version, e.g. vllm==0.6.3",
    ARG_RE: "letters, digits and . _ / = : , + @ - (no spaces, quotes, $ or %)",
    VERSION_RE: "a version major.minor.patch, e.g. 1.10.5",
    NAME_RE: "a-z, 0-9, '_' and '-', starting with a letter or digit, at most 63 characters",
    DURATION_RE: "a duration such as 30s, 5m or 1h30m",
    SPAN_RE: "a time span such as 30s, 5min or 1h",
    RETENTION_RE: "a time such as 1month, 2week or 30day",
}


# --- validators shared by several types -----------------------------------------------------


def _plain_segments(value: str) -> str:
    """No "." or ".." path segment: a path means what it says, inside its directory."""
    if {".", ".."} & set(value.split("/")):
        raise ValueError(f"{value!r} leaves its directory (allowed: a path inside it, no '..')")
    return value


def _strict_cidr(value: Any) -> Any:
    try:
        ipaddress.ip_network(str(value), strict=True)
    except ValueError as exc:
        raise ValueError(
            f"{value!r} is not a network in CIDR notation ({exc}; "
            "allowed: e.g. 10.0.0.0/24 or 2001:db8::/64, with no host bits set)"
        ) from None
    return value


def listed_twice(names: Iterable[str]) -> list[str]:
    """The names that appear more than once, sorted (for "listed twice" errors)."""
    seen: set[str] = set()
    twice: set[str] = set()
    for name in names:
        (twice if name in seen else seen).add(name)
    return sorted(twice)


def one_of(allowed: tuple[str, ...], what: str) -> BeforeValidator:
    """A validator for a name from a table (case-insensitive, stored lowercase)."""

    def check(value: Any) -> str:
        name = str(value).lower()
        if name not in allowed:
            raise ValueError(f"{value!r} is not {what} (allowed: {', '.join(allowed)})")
        return name

    return BeforeValidator(check)


def parse_duration_ns(value: str) -> int:
    """A Go duration string (``1h30m``, ``10s``) as integer nanoseconds, the unit of
    every duration in Nomad's JSON job API."""
    units = {"ns": 1, "us": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}
    if not re.match(DURATION_RE, value):
        raise ValueError(f"{value!r} is not a duration (allowed: e.g. 30s, 5m, 1h30m)")
    return sum(int(n) * units[u] for n, u in re.findall(r"([0-9]+)(ns|us|ms|s|m|h)", value))


# --- the types ------------------------------------------------------------------------------

UserName = Annotated[str, StringConstraints(pattern=USERNAME_RE)]
GroupName = Annotated[str, StringConstraints(pattern=GROUPNAME_RE)]
HostName = Annotated[str, StringConstraints(pattern=HOSTNAME_RE)]
Name = Annotated[str, StringConstraints(pattern=NAME_RE)]
ServiceName = Annotated[str, StringConstraints(pattern=SERVICE_NAME_RE)]
PackageName = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9.+_:-]*$")]
HoldPattern = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9.+_*-]*$")]
NtpServer = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9.:-]*$")]
EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
UnitName = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9:_.@-]+\.(service|socket|target|timer)$")
]

HttpUrl = Annotated[str, StringConstraints(pattern=HTTP_URL_RE)]
Uri = Annotated[str, StringConstraints(pattern=URI_RE)]

AbsPath = Annotated[str, StringConstraints(pattern=ABS_PATH_RE), AfterValidator(_plain_segments)]
RelPath = Annotated[str, StringConstraints(pattern=REL_PATH_RE), AfterValidator(_plain_segments)]

Port = Annotated[int, Field(ge=1, le=65535)]
# Ports a service's own user may bind (no CAP_NET_BIND_SERVICE needed)
UnprivilegedPort = Annotated[int, Field(ge=1024, le=65535)]

Sha256 = Annotated[str, StringConstraints(pattern=SHA256_RE)]
Version = Annotated[str, StringConstraints(pattern=VERSION_RE)]
Pin = Annotated[str, StringConstraints(pattern=PIN_RE)]
GpuUuid = Annotated[str, StringConstraints(pattern=GPU_UUID_RE)]
ExtraArg = Annotated[str, StringConstraints(pattern=ARG_RE)]

Size = Annotated[str, StringConstraints(pattern=SIZE_RE)]
MemLimit = Annotated[str, StringConstraints(pattern=r"^([0-9]+[KMGT]?|[0-9]{1,2}%|infinity)$")]
Span = Annotated[str, StringConstraints(pattern=SPAN_RE)]
Retention = Annotated[str, StringConstraints(pattern=RETENTION_RE)]

Cidr = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_strict_cidr)]

# firewall and hardening
Rate = Annotated[str, StringConstraints(pattern=r"^[1-9][0-9]{0,5}/(second|minute|hour)$")]
RuleName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")]
# nft interface names: up to 15 characters, a trailing * is a wildcard (br-*)
IfName = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9_.-]{1,15}\*?$")]
SysctlKey = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]+(\.[a-zA-Z0-9_-]+)+$")]
SysctlValue = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
SshAlgorithm = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9.@-]*$")]
# nvidia
DriverVersion = Annotated[str, StringConstraints(pattern=r"^[0-9]+(\.[0-9]+){1,2}$")]
# vault: KV v2 paths and mounts; no segment starts with a dot: no "..", no "."
_SEGMENT = r"[A-Za-z0-9_-][A-Za-z0-9_.-]*"
KvPath = Annotated[str, StringConstraints(pattern=rf"^{_SEGMENT}(/{_SEGMENT})*$")]
SecretMode = Annotated[str, StringConstraints(pattern=r"^0?[0-7][0-7]0$")]  # never world-readable
# monitoring: a path on the controller, absolute or relative to the repository copy
RunPath = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9._/-]*[A-Za-z0-9._-]$"),
    AfterValidator(_plain_segments),
]
Calendar = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9*:/,.~ -]{1,64}$")]  # OnCalendar=
# nomad: server RPC addresses (host, IPv4, [IPv6], with an optional :port)
ServerAddr = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9]([A-Za-z0-9.:\[\]-]*[A-Za-z0-9\]])?(:[0-9]{1,5})?$"),
]
IMAGE_RE = r"^[a-z0-9][a-z0-9._/:-]*@sha256:[0-9a-f]{64}$"


def _image(value: str) -> str:
    if not re.fullmatch(IMAGE_RE, value):
        raise ValueError(
            f"{value!r} is not an image pinned by digest (allowed: e.g. "
            "docker.io/vllm/vllm-openai@sha256:<64 hex digits>)"
        )
    return value


Image = Annotated[str, AfterValidator(_image)]  # a container image pinned by digest
