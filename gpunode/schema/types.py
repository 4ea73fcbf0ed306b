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
from urllib.parse import unquote

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


# The longest string any key takes (an SSH public key is the longest legitimate value):
# a 100 kB value is refused at load, not carried into a command line or a file.
MAX_STRING = 4096


class Model(BaseModel):
    """A config section: unknown keys are errors, values are immutable, types are strict (a
    boolean is not a number, a number is not a boolean or a string), and every string in it
    (a value, a list item, a mapping key) is printable ASCII of at most MAX_STRING
    characters that does not start with '-'.

    ASCII: a Cyrillic 'а' or a fullwidth '／' looks like its Latin twin in a review and in a
    log, but names another user, host or file. No leading '-': a value that lands as a
    command's argument must not read as an option; a field whose values are options by
    design lists itself in ``OPTIONS``."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        strict=True,
        str_max_length=MAX_STRING,
    )

    # Fields that hold raw node config layers (validated as NodeConfig on their own, where
    # errors name the exact key): not scanned here.
    RAW_LAYERS: ClassVar[frozenset[str]] = frozenset()
    # Fields whose values are command-line options by design (they may start with '-').
    OPTIONS: ClassVar[frozenset[str]] = frozenset()

    @field_validator("*", mode="before")
    @classmethod
    def _printable(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name in cls.RAW_LAYERS or _is_section(cls, info.field_name):
            return value
        for where, text in _strings(value):
            try:
                check_text(text, option=info.field_name in cls.OPTIONS)
            except ValueError as exc:
                raise ValueError(f"{where}{exc}") from None
        return value


def check_text(text: str, option: bool = False) -> None:
    """Refuse a control character, a non-ASCII character and (unless ``option``) a leading
    '-' in one string of the configuration."""
    bad = _CONTROL.search(text)
    if bad:
        raise ValueError(
            f"{text[:40]!r} holds the control character {bad.group()!r} (allowed: "
            "printable text: no newline, tab, NUL, escape or other control character)"
        )
    if not text.isascii():
        char = next(c for c in text if not c.isascii())
        raise ValueError(
            f"{text[:40]!r} holds the non-ASCII character {char!r} (U+{ord(char):04X}) "
            "(allowed: ASCII letters, digits and punctuation: a look-alike letter from another "
            "script names something else)"
        )
    if text.startswith("-") and not option:
        raise ValueError(
            f"{text[:40]!r} starts with '-' (allowed: a value that does not start with '-': "
            "a command would read it as an option)"
        )


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


def _strings(value: Any) -> Iterator[tuple[str, str]]:
    """(where, text) of the strings a field holds itself: the value, its list items, its
    mapping keys and values; ``where`` is "" for the value, "[i] " for a list item, "key "
    for a mapping key, "[key] " for a mapping value. A nested mapping is a nested section:
    its own model checks it (and names it)."""
    if isinstance(value, str):
        yield "", value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(key, str):
                yield "key ", key
            if isinstance(item, str):
                yield f"[{key!r:.40}] ", item
            elif isinstance(item, (list, tuple)):
                yield from ((f"[{key!r:.40}]{w}", t) for w, t in _strings(item))
    elif isinstance(value, (list, tuple)):
        yield from ((f"[{i}] ", item) for i, item in enumerate(value) if isinstance(item, str))


# --- patterns -------------------------------------------------------------------------------

USERNAME_RE = r"^[a-z_][a-z0-9_-]{0,31}$"
GROUPNAME_RE = r"^[a-z][a-z0-9_]{0,62}$"
HOSTNAME_RE = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
# An inventory's host name: pyinfra's host name, the `Host` of the ssh_config gpunode verify
# writes, and the default hostname when it is one (HOSTNAME_RE).
INVENTORY_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
SIZE_RE = r"^[0-9]+[KMGT]?$"
SHA256_RE = r"^[0-9a-f]{64}$"
# Absolute paths: letters, digits and . _ - + @ : , = only, no empty, "." or ".." segment
# (checked by _plain_segments), no trailing slash.
ABS_PATH_RE = r"^(/[A-Za-z0-9._+@:,=-]+)+$"
# Paths on the controller (pyinfra and ssh read them): absolute, or under the home directory.
CONTROLLER_PATH_RE = r"^~?(/[A-Za-z0-9._+@,=-]+)+$"
# Relative paths inside a directory: no leading '-' or '/', no empty segment, no trailing
# slash; no "." or ".." segment (checked by _plain_segments).
REL_PATH_RE = r"^[A-Za-z0-9_.][A-Za-z0-9._-]*(/[A-Za-z0-9._-]+)*$"
SERVICE_NAME_RE = r"^[a-z][a-z0-9-]{0,22}$"
SECRET_NAME_RE = r"^[a-z0-9][a-z0-9_-]{0,62}$"  # noqa: S105 - a pattern
# URLs (checked by _url): a DNS name, an IPv4 address or a bracketed IPv6 address, an
# optional port, and a path of unreserved characters and %XX escapes. No user:password@ (it
# would be printed with the command: mirrors that need credentials use ~/.netrc), no query,
# no fragment, no "." or ".." segment.
_URL_HOST = r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?)(:[0-9]{1,5})?"
_URL_SEGMENT = r"/([A-Za-z0-9._~+=,-]|%[0-9A-Fa-f]{2})*"
HTTP_URL_RE = rf"^https?://{_URL_HOST}({_URL_SEGMENT})*$"
# http(s) from a mirror, or file:// on a local mirror or NFS mount: always a path.
URI_RE = rf"^(https?://{_URL_HOST}|file://)({_URL_SEGMENT})+$"
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
PACKAGE_RE = r"^[a-zA-Z0-9][a-zA-Z0-9.+_:-]*$"
HOLD_RE = r"^[a-zA-Z0-9][a-zA-Z0-9.+_*-]*$"
NTP_SERVER_RE = r"^[a-zA-Z0-9][a-zA-Z0-9.:-]*$"
ENV_NAME_RE = r"^[A-Za-z_][A-Za-z0-9_]*$"
UNIT_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9:_.@-]*\.(service|socket|target|timer)$"
MEM_LIMIT_RE = r"^([0-9]+[KMGT]?|[0-9]{1,2}%|infinity)$"
RATE_RE = r"^[1-9][0-9]{0,5}/(second|minute|hour)$"
RULE_NAME_RE = r"^[a-z0-9][a-z0-9_-]{0,31}$"
IF_NAME_RE = r"^[a-zA-Z0-9_.-]{1,15}\*?$"  # nft interface names; a trailing * is a wildcard
SYSCTL_KEY_RE = r"^[a-z0-9_]+(\.[a-zA-Z0-9_-]+)+$"
SSH_ALGORITHM_RE = r"^[a-z0-9][a-z0-9.@-]*$"
KERNEL_MODULE_RE = r"^[a-z0-9][a-z0-9_-]{0,55}$"
DRIVER_VERSION_RE = r"^[0-9]+(\.[0-9]+){1,2}$"
# Vault KV v2 paths and mounts; no segment starts with a dot or a dash: no "..", no "."
_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
KV_PATH_RE = rf"^{_SEGMENT}(/{_SEGMENT})*$"
SECRET_KEY_RE = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"  # noqa: S105 - a pattern
SECRET_MODE_RE = r"^0?[0-7][0-7]0$"  # noqa: S105 - never world-readable
VAULT_NAMESPACE_RE = r"^[A-Za-z0-9][A-Za-z0-9_-]*(/[A-Za-z0-9][A-Za-z0-9_-]*)*$"
# An AppRole role_id: a UUID as Vault generates it, or a custom id of the same characters.
ROLE_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
RUN_PATH_RE = r"^[A-Za-z0-9._/-]*[A-Za-z0-9._-]$"
CALENDAR_RE = r"^[A-Za-z0-9*:/,.~ -]{1,64}$"  # systemd OnCalendar=
SERVER_ADDR_RE = r"^[A-Za-z0-9]([A-Za-z0-9.:\[\]-]*[A-Za-z0-9\]])?(:[0-9]{1,5})?$"
# A DNS name (checked by _host_or_address with the IP addresses): labels of letters, digits
# and '-' (not first or last), at most 63 each, separated by single dots, at most 253 in all.
DNS_NAME_RE = (
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
# An authorized_keys line without options: key type, base64 key, optional comment.
SSH_KEY_RE = r"^(ssh|ecdsa|sk)-[a-z0-9@.-]+ [A-Za-z0-9+/.]+=*( [A-Za-z0-9@._+:,=/ -]*)?$"
SERVED_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"
PACKAGE_VERSION_RE = r"^[A-Za-z0-9][A-Za-z0-9.+:~_-]*$"
PROGRAM_RE = r"^/?[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$"
PERIOD_RE = r"^[0-9]+(s|m|h)$"
GPU_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9-]*$"
GPU_MEMORY_RE = r"^[0-9]+ (MiB|GiB)$"
GPU_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$"
# Patterns written inline in section modules (keep the wording next to the others)
CONTAINER_TOOLKIT_VERSION_RE = r"^[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.~]+)?$"
MAX_STARTUPS_RE = r"^[0-9]+(:[0-9]+:[0-9]+)?$"

# Every pattern above, in words (tests/unit/test_hostile.py checks that each pattern a model
# uses is here): the loader prints this instead of the expression.
PATTERN_HELP: dict[str, str] = {
    USERNAME_RE: "a POSIX user name: a-z, 0-9, '_' and '-', starting with a letter or '_', "
    "at most 32 characters",
    GROUPNAME_RE: "a-z, 0-9 and '_', starting with a letter (group names are Python names)",
    HOSTNAME_RE: "a hostname label: a-z, 0-9 and '-', at most 63 characters",
    INVENTORY_NAME_RE: "a host name: letters, digits, '.', '_' and '-', starting with a "
    "letter or digit, at most 63 characters",
    SIZE_RE: "a size such as 512M or 2G",
    SHA256_RE: "64 lowercase hex digits, as sha256sum prints them",
    ABS_PATH_RE: "an absolute path: '/' then letters, digits and . _ - + @ : , = "
    "(no spaces, quotes, shell characters or trailing '/')",
    CONTROLLER_PATH_RE: "a path on the controller: absolute, or ~/ then a path; letters, "
    "digits and . _ - + @ , = (no spaces, quotes, '%', shell characters or trailing '/')",
    REL_PATH_RE: "a relative path: segments of letters, digits, '.', '_' and '-' separated by "
    "'/', not starting with '-' or '/'",
    SERVICE_NAME_RE: "a-z, 0-9 and '-', starting with a letter, at most 23 characters",
    SECRET_NAME_RE: "a-z, 0-9, '_' and '-', starting with a letter or digit, at most 63 characters",
    URI_RE: "http(s)://host[:port]/path or file:///path, with no user:password@",
    HTTP_URL_RE: "an http:// or https:// URL: a host name or IP address, an optional :port and "
    "a path of letters, digits, . _ ~ + = , - and %XX escapes (no user:password@, spaces, "
    "quotes, backslash, '?' or '#')",
    GPU_UUID_RE: "a GPU or MIG UUID as nvidia-smi -L prints it, e.g. "
    "GPU-9221d5d1-b60b-a624-bf14-0a1819cfda3b",
    PIN_RE: "an exact pin name==version, e.g. vllm==0.6.3",
    ARG_RE: "letters, digits and . _ / = : , + @ - (no spaces, quotes, $ or %)",
    VERSION_RE: "a version major.minor.patch, e.g. 1.10.5",
    NAME_RE: "a-z, 0-9, '_' and '-', starting with a letter or digit, at most 63 characters",
    DURATION_RE: "a duration such as 30s, 5m or 1h30m",
    SPAN_RE: "a time span such as 30s, 5min or 1h",
    RETENTION_RE: "a time such as 1month, 2week or 30day",
    PACKAGE_RE: "a package name: letters, digits and . + _ : -, starting with a letter or digit",
    HOLD_RE: "a package-name prefix: letters, digits and . + _ -, '*' matching anything",
    NTP_SERVER_RE: "a host name or IP address: letters, digits, '.', ':' and '-'",
    ENV_NAME_RE: "an environment variable name: letters, digits and '_', not starting with a digit",
    UNIT_NAME_RE: "a systemd unit name such as gpunode-inference-chat.service: letters, digits "
    "and : _ . @ -, ending in .service, .socket, .target or .timer",
    MEM_LIMIT_RE: "a size such as 512M or 2G, a percentage of RAM such as 90%, or infinity",
    RATE_RE: "a rate such as 10/second, 5/minute or 100/hour",
    RULE_NAME_RE: "a-z, 0-9, '_' and '-', starting with a letter or digit, at most 32 characters",
    IF_NAME_RE: "an interface name: letters, digits, '_', '.' and '-', at most 15 characters, "
    "a trailing '*' matching any suffix",
    SYSCTL_KEY_RE: "a sysctl key such as net.ipv4.ip_forward",
    SSH_ALGORITHM_RE: "an OpenSSH algorithm name such as aes256-gcm@openssh.com",
    KERNEL_MODULE_RE: "a kernel module name such as sctp: a-z, 0-9, '_' and '-'",
    DRIVER_VERSION_RE: "a driver version such as 580.95.05",
    KV_PATH_RE: "a Vault path: segments of letters, digits, '_', '.' and '-' separated by '/', "
    "none starting with '.' or '-'",
    SECRET_KEY_RE: "a key inside a Vault secret: letters, digits, '_', '.' and '-', not "
    "starting with '.' or '-'",
    SECRET_MODE_RE: "an octal mode whose last digit is 0 (never readable by others), e.g. 0640",
    VAULT_NAMESPACE_RE: "a Vault namespace: segments of letters, digits, '_' and '-' separated "
    "by '/'",
    ROLE_ID_RE: "an AppRole role_id: a UUID as Vault generates it, or letters, digits, '.', '_' "
    "and '-', at most 128 characters",
    RUN_PATH_RE: "a path on the controller, absolute or relative to the repository copy: "
    "letters, digits, '.', '_', '-' and '/'",
    CALENDAR_RE: "a systemd OnCalendar= expression such as hourly or *:0/15: letters, digits, "
    "spaces and * : / , . ~ -, at most 64 characters",
    DNS_NAME_RE: "a DNS name such as logs.example.com (labels of letters, digits and '-', "
    "not starting or ending with '-', separated by single dots) or an IP address",
    SERVER_ADDR_RE: "a server address: a DNS name, an IPv4 address or [IPv6], with an optional "
    ":port, e.g. 10.0.0.10:4647",
    SSH_KEY_RE: "an OpenSSH public key line: the key type (ssh-ed25519, ecdsa-sha2-nistp256, "
    "sk-ssh-ed25519@openssh.com, ...), the base64 key and an optional comment of letters, "
    "digits, spaces and @ . _ + : , = / - (no options, quotes or shell characters)",
    SERVED_NAME_RE: "a model name: letters, digits and . _ : / -, starting with a letter or "
    "digit, at most 128 characters",
    PACKAGE_VERSION_RE: "a package version: letters, digits and . + : ~ _ -, starting with a "
    "letter or digit",
    PROGRAM_RE: "a program path, absolute or relative to the runtime's root: segments of "
    "letters, digits, '.', '_' and '-', none starting with '.' or '-'",
    PERIOD_RE: "a period such as 30s, 1m or 1h",
    GPU_ID_RE: "a GPU UUID such as GPU-9221d5d1-b60b-a624-bf14-0a1819cfda3b: letters, digits "
    "and '-'",
    GPU_MEMORY_RE: "a memory size such as 16 GiB or 40960 MiB",
    GPU_NAME_RE: "a GPU name as the device plugin reports it, e.g. NVIDIA H100 80GB HBM3: "
    "letters, digits, spaces, '.', '_' and '-'",
    CONTAINER_TOOLKIT_VERSION_RE: "a package version such as 1.17.8-1",
    MAX_STARTUPS_RE: "a number, or start:rate:full such as 10:30:60",
}


# --- validators shared by several types -----------------------------------------------------


def _plain_segments(value: str) -> str:
    """No "." or ".." path segment: a path means what it says, inside its directory."""
    if {".", ".."} & set(value.split("/")):
        raise ValueError(f"{value!r} leaves its directory (allowed: a path inside it, no '..')")
    return value


def _strict_cidr(value: Any) -> Any:
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return value  # a validated model's value
    try:
        if not isinstance(value, str):
            raise ValueError(f"a {type(value).__name__}, not a string")
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ValueError(
            f"{value!r} is not a network in CIDR notation ({exc}; "
            "allowed: e.g. 10.0.0.0/24 or 2001:db8::/64, with no host bits set)"
        ) from None


def _ip_address(value: str) -> str:
    """An IP address in its canonical spelling (ipaddress's: 2001:db8::1, not 2001:DB8:0::1)."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(
            f"{value!r} is not an IP address (allowed: e.g. 0.0.0.0, 127.0.0.1, ::, 192.0.2.10)"
        ) from None


def _host_or_address(value: str) -> str:
    """An IP address (canonical spelling) or a DNS name (lowercase: DNS names and the names in
    a certificate compare without case)."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    labels = value.split(".")
    if not re.fullmatch(DNS_NAME_RE, value) or labels[-1].isdigit():
        raise ValueError(f"{value[:80]!r} is not allowed (allowed: {PATTERN_HELP[DNS_NAME_RE]})")
    return value.lower()


def redact_url(value: str) -> str:
    """A URL as errors show it: any ``user:password@`` replaced by ``***@``."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/]*@", r"\1***@", value)


def _url(pattern: str) -> Any:
    """A validator for URLs of ``pattern`` (HTTP_URL_RE, URI_RE): the port in range, an IPv6
    literal valid, no "." or ".." segment (also as %2e); errors never show a password."""

    def check(value: str) -> str:
        shown = redact_url(value)
        if not re.fullmatch(pattern, value):
            raise ValueError(f"{shown[:80]!r} is not allowed (allowed: {PATTERN_HELP[pattern]})")
        authority, _, path = value.split("://", 1)[1].partition("/")
        host, port = re.fullmatch(r"(.*?)(?::([0-9]+))?", authority).groups()  # type: ignore[union-attr]
        if port and not 1 <= int(port) <= 65535:
            raise ValueError(f"{shown[:80]!r}: port {port} (allowed: a port from 1 to 65535)")
        if host.startswith("["):
            try:
                ipaddress.IPv6Address(host[1:-1])
            except ValueError:
                raise ValueError(
                    f"{shown[:80]!r}: {host} is not an IPv6 address (allowed: e.g. [2001:db8::1])"
                ) from None
        segments = {unquote(s).lower() for s in path.split("/")}
        if {".", ".."} & segments:
            raise ValueError(
                f"{shown[:80]!r} has a '.' or '..' path segment (allowed: a plain path)"
            )
        return value

    return AfterValidator(check)


# --- accounts a node already has ---------------------------------------------------------

# Users and groups of the base system (Debian's base-passwd, Ubuntu's and EL9's setup
# packages, and the system daemons every supported distro installs): a name gpunode creates
# or hands a file to must not be one of them, or an admin login would take over a daemon's
# account, and a secret file would become readable by whatever runs as it.
SYSTEM_USERS = frozenset(
    {
        "root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp",
        "proxy", "www-data", "backup", "list", "irc", "gnats", "nobody", "nfsnobody", "adm",
        "halt", "shutdown", "operator", "ftp", "dbus", "messagebus", "sshd", "syslog", "uuidd",
        "tcpdump", "tss", "polkitd", "dnsmasq", "landscape", "pollinate", "usbmux", "lxd",
        "chrony", "sssd", "rpc", "rpcuser", "unbound", "avahi", "colord", "rtkit", "geoclue",
        "ubuntu", "debian", "cloud-user", "ec2-user", "fwupd-refresh", "dhcpcd",
    }
)  # fmt: skip
SYSTEM_GROUPS = frozenset(
    {
        "root", "daemon", "bin", "sys", "adm", "tty", "disk", "lp", "mail", "news", "uucp",
        "man", "proxy", "kmem", "dialout", "fax", "voice", "cdrom", "floppy", "tape", "sudo",
        "audio", "dip", "www-data", "backup", "operator", "list", "irc", "src", "gnats",
        "shadow", "utmp", "video", "sasl", "plugdev", "staff", "games", "users", "nogroup",
        "nobody", "input", "kvm", "render", "sgx", "ssh", "crontab", "messagebus", "netdev",
        "lxd", "docker", "tss", "polkitd", "wheel", "dbus", "ssh_keys", "utempter", "chrony",
    }
)  # fmt: skip
# Prefixes of system accounts: systemd's own (systemd-network, systemd-journal, ...) and
# Debian's convention for new system users (_apt, _chrony, _ssh).
SYSTEM_PREFIXES = ("systemd-", "_")
# Users the packages gpunode installs create: Debian's prometheus-node-exporter runs as
# prometheus, HashiCorp's nomad package creates nomad, NVIDIA's driver packages create
# nvidia-persistenced.
PACKAGE_USERS = frozenset({"prometheus", "nomad", "nvidia-persistenced"})
# Every inference service runs as its own user gpunode-<service> (gpunode/inference.py).
SERVICE_USER_PREFIX = "gpunode-"


def system_user(name: str) -> bool:
    return name in SYSTEM_USERS or name.startswith(SYSTEM_PREFIXES)


def system_group(name: str) -> bool:
    return name in SYSTEM_GROUPS or name.startswith(SYSTEM_PREFIXES)


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


def _pattern(regex: str) -> StringConstraints:
    return StringConstraints(pattern=regex)


# --- the types ------------------------------------------------------------------------------

UserName = Annotated[str, _pattern(USERNAME_RE)]
GroupName = Annotated[str, _pattern(GROUPNAME_RE)]
HostName = Annotated[str, _pattern(HOSTNAME_RE)]
InventoryName = Annotated[str, _pattern(INVENTORY_NAME_RE)]
Name = Annotated[str, _pattern(NAME_RE)]
ServiceName = Annotated[str, _pattern(SERVICE_NAME_RE)]
SecretName = Annotated[str, _pattern(SECRET_NAME_RE)]
PackageName = Annotated[str, _pattern(PACKAGE_RE)]
HoldPattern = Annotated[str, _pattern(HOLD_RE)]
NtpServer = Annotated[str, _pattern(NTP_SERVER_RE)]
EnvName = Annotated[str, _pattern(ENV_NAME_RE)]
UnitName = Annotated[str, _pattern(UNIT_NAME_RE)]

HttpUrl = Annotated[str, _url(HTTP_URL_RE)]
Uri = Annotated[str, _url(URI_RE)]
IpAddress = Annotated[str, AfterValidator(_ip_address)]
# A server's DNS name or IP address, without a port (a log host: also the name its
# certificate must carry)
HostOrAddress = Annotated[str, AfterValidator(_host_or_address)]

AbsPath = Annotated[str, _pattern(ABS_PATH_RE), AfterValidator(_plain_segments)]
RelPath = Annotated[str, _pattern(REL_PATH_RE), AfterValidator(_plain_segments)]
ControllerPath = Annotated[str, _pattern(CONTROLLER_PATH_RE), AfterValidator(_plain_segments)]

Port = Annotated[int, Field(ge=1, le=65535)]
# Ports a service's own user may bind (no CAP_NET_BIND_SERVICE needed)
UnprivilegedPort = Annotated[int, Field(ge=1024, le=65535)]

Sha256 = Annotated[str, _pattern(SHA256_RE)]
Version = Annotated[str, _pattern(VERSION_RE)]
Pin = Annotated[str, _pattern(PIN_RE)]
GpuUuid = Annotated[str, _pattern(GPU_UUID_RE)]
ExtraArg = Annotated[str, _pattern(ARG_RE)]
PackageVersion = Annotated[str, _pattern(PACKAGE_VERSION_RE)]
Program = Annotated[str, _pattern(PROGRAM_RE)]
ServedName = Annotated[str, _pattern(SERVED_NAME_RE), AfterValidator(_plain_segments)]
SshPublicKey = Annotated[str, _pattern(SSH_KEY_RE)]

Size = Annotated[str, _pattern(SIZE_RE)]
MemLimit = Annotated[str, _pattern(MEM_LIMIT_RE)]
Duration = Annotated[str, _pattern(DURATION_RE)]
Span = Annotated[str, _pattern(SPAN_RE)]
Retention = Annotated[str, _pattern(RETENTION_RE)]
Period = Annotated[str, _pattern(PERIOD_RE)]

Cidr = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_strict_cidr)]

# firewall and hardening
Rate = Annotated[str, _pattern(RATE_RE)]
RuleName = Annotated[str, _pattern(RULE_NAME_RE)]
IfName = Annotated[str, _pattern(IF_NAME_RE)]
SysctlKey = Annotated[str, _pattern(SYSCTL_KEY_RE)]
SysctlValue = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
SshAlgorithm = Annotated[str, _pattern(SSH_ALGORITHM_RE)]
KernelModule = Annotated[str, _pattern(KERNEL_MODULE_RE)]
# nvidia
DriverVersion = Annotated[str, _pattern(DRIVER_VERSION_RE)]
GpuId = Annotated[str, _pattern(GPU_ID_RE)]
GpuMemory = Annotated[str, _pattern(GPU_MEMORY_RE)]
GpuName = Annotated[str, _pattern(GPU_NAME_RE)]
# vault
KvPath = Annotated[str, _pattern(KV_PATH_RE)]
SecretKey = Annotated[str, _pattern(SECRET_KEY_RE)]
SecretMode = Annotated[str, _pattern(SECRET_MODE_RE)]
VaultNamespace = Annotated[str, _pattern(VAULT_NAMESPACE_RE)]
RoleId = Annotated[str, _pattern(ROLE_ID_RE)]
# monitoring: a path on the controller, absolute or relative to the repository copy
RunPath = Annotated[str, _pattern(RUN_PATH_RE), AfterValidator(_plain_segments)]
Calendar = Annotated[str, _pattern(CALENDAR_RE)]  # OnCalendar=
# nomad: server RPC addresses (host, IPv4, [IPv6], with an optional :port)
ServerAddr = Annotated[str, _pattern(SERVER_ADDR_RE)]
IMAGE_RE = r"^[a-z0-9][a-z0-9._/:-]*@sha256:[0-9a-f]{64}$"


def _image(value: str) -> str:
    if not re.fullmatch(IMAGE_RE, value):
        raise ValueError(
            f"{value!r} is not an image pinned by digest (allowed: e.g. "
            "docker.io/vllm/vllm-openai@sha256:<64 hex digits>)"
        )
    return value


Image = Annotated[str, AfterValidator(_image)]  # a container image pinned by digest
