"""Config files gpunode renders, and the renderers that put one inventory value into one file
format safely (every value is hostile: each renderer escapes it for its format, or refuses
what the format cannot represent with a :class:`ConfigError` that says what is allowed).

- :func:`environment`: jinja2 over ``templates/`` (no HTML: no autoescape).
- :func:`shell_value`: a POSIX shell word, for files a shell sources (DKMS's framework.conf).
- :func:`ssh_config_value` / :func:`ssh_config_line`: one ssh_config(5) argument.
- :func:`ini_value`: one value of an ini file read by libdnf (dnf.conf).
- :func:`sudoers_value`: one sudoers(5) ``Defaults`` string value.
- :func:`rainerscript_string`: one rsyslog RainerScript string constant (rsyslog.conf).
- :func:`haproxy_word`, :func:`haproxy_path`, :func:`haproxy_string`,
  :func:`haproxy_address`, :func:`haproxy_map_line`: haproxy.cfg words and map file lines.
"""

from __future__ import annotations

import ipaddress
import re
import shlex

import jinja2

from gpunode.paths import TEMPLATES
from gpunode.schema.types import ConfigError


def environment(*subdirs: str) -> jinja2.Environment:
    """A jinja2 environment over ``templates/<subdir>`` for each subdir; undefined
    variables are errors. Filters: ``sh`` (:func:`shell_value`)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([TEMPLATES / d for d in subdirs]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # noqa: S701 - nftables, sshd and sysctl text, not HTML
    )
    env.filters["sh"] = shell_value
    return env


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _no_control(value: str, where: str) -> None:
    if _CONTROL.search(value):
        raise ConfigError(
            f"{where}: {value!r} holds a control character (newline, tab, NUL, escape, ...) "
            "(allowed: printable characters only)"
        )


# --- POSIX shell ------------------------------------------------------------------------


def shell_value(value: str, where: str = "value") -> str:
    """``value`` as one shell word that expands to exactly ``value`` (``shlex.quote``): for
    ``NAME=<word>`` lines in files a shell sources. Control characters are refused (a
    quoted newline is safe for sh, but not for every tool that greps such files)."""
    _no_control(value, where)
    return shlex.quote(value)


# --- systemd unit files (systemd.syntax(7), systemd.service(5) "Command lines") ----------

_SYSTEMD_PLAIN = re.compile(r"[A-Za-z0-9._/=:,+@-]+")


def systemd_word(value: str, where: str = "value") -> str:
    """``value`` as one word of a unit's command line that systemd passes on exactly:
    ``%`` (specifiers) and ``$`` (variable expansion) doubled, and a word with anything
    but plain characters double-quoted with ``\\`` and ``"`` escaped (so ``;``, spaces
    and quotes stay inside the one argument)."""
    _no_control(value, where)
    word = value.replace("%", "%%").replace("$", "$$")
    if _SYSTEMD_PLAIN.fullmatch(word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_command_line(argv: list[str], where: str = "ExecStart") -> str:
    """An ``ExecStart=`` value: each argument one :func:`systemd_word`."""
    return " ".join(systemd_word(arg, where) for arg in argv)


def systemd_assignment(key: str, value: str, where: str = "Environment") -> str:
    """An ``Environment=`` value: ``KEY=value`` as one quoted word when it needs quoting
    (``%`` doubled; ``$`` is taken literally there)."""
    _no_control(value, where)
    pair = f"{key}={value}".replace("%", "%%")
    if _SYSTEMD_PLAIN.fullmatch(pair):
        return pair
    return '"' + pair.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- ssh_config(5) ----------------------------------------------------------------------

# Keywords whose arguments expand %-tokens (ssh_config(5) TOKENS); "%" is written "%%".
SSH_TOKEN_KEYWORDS = frozenset(
    {
        "certificatefile",
        "controlpath",
        "identityagent",
        "identityfile",
        "knownhostscommand",
        "localforward",
        "remotecommand",
        "remoteforward",
        "userknownhostsfile",
        "hostname",
        "localcommand",
        "proxycommand",
        "proxyjump",
    }
)
# Keywords whose arguments expand ${VAR} (ssh_config(5) ENVIRONMENT VARIABLES): there is no
# escape for "${", so such a value is refused.
SSH_ENV_KEYWORDS = frozenset(
    {
        "certificatefile",
        "controlpath",
        "identityagent",
        "identityfile",
        "knownhostscommand",
        "userknownhostsfile",
        "localforward",
        "remoteforward",
    }
)
# Keywords whose arguments are patterns (Host) or glob(7) wildcards (Include): a literal
# pattern character cannot be written, so it is refused.
SSH_PATTERN_KEYWORDS = {"host": "*?!,", "include": "*?["}


def ssh_config_value(keyword: str, value: str, where: str = "value") -> str:
    """One ssh_config(5) argument that ssh reads back as exactly ``value``.

    Arguments are split on whitespace unless double-quoted, and ssh_config has no escape for
    a double quote inside quotes, so: a value with a space, ``#`` or ``=`` is double-quoted;
    ``"``, ``\\``, ``'`` and control characters are refused; ``%`` is doubled for keywords
    that expand tokens; ``${`` is refused for keywords that expand environment variables;
    pattern and glob characters are refused for ``Host`` and ``Include``.
    """
    kw = keyword.lower()
    _no_control(value, where)
    allowed = "(allowed: printable characters except \" \\ '"
    if not value or any(c in value for c in "\"\\'"):
        raise ConfigError(
            f"{where}: {value!r} cannot be written to ssh_config as one {keyword} argument "
            f"{allowed}, not empty)"
        )
    if kw in SSH_ENV_KEYWORDS and "${" in value:
        raise ConfigError(
            f"{where}: {value!r}: ssh expands '${{...}}' in {keyword} and has no escape for it "
            f"{allowed} and '${{')"
        )
    special = SSH_PATTERN_KEYWORDS.get(kw, "") + (" " if kw == "host" else "")
    bad = [c for c in special if c in value]
    if bad:
        raise ConfigError(
            f"{where}: {value!r}: ssh reads {''.join(bad)!r} in {keyword} as a pattern "
            f"{allowed} and {special!r})"
        )
    if kw in SSH_TOKEN_KEYWORDS:
        value = value.replace("%", "%%")
    if any(c in value for c in " #="):
        value = f'"{value}"'
    return value


def ssh_config_line(keyword: str, value: str | int, where: str = "value") -> str:
    """``Keyword argument``, the argument rendered by :func:`ssh_config_value`."""
    return f"{keyword} {ssh_config_value(keyword, str(value), where)}"


# --- ini files read by libdnf (dnf.conf) -----------------------------------------------


def ini_value(value: str, where: str = "value") -> str:
    """A ``key=value`` value for dnf.conf. libdnf's ini parser takes the rest of the line,
    stripped, and reads a following line that starts with a space as its continuation: a
    control character (a newline would start a new key) and leading or trailing whitespace
    (it would be lost) are refused; nothing is quoted (quotes would be part of the value)."""
    _no_control(value, where)
    if value != value.strip():
        raise ConfigError(
            f"{where}: {value!r} starts or ends with whitespace (allowed: a value without "
            "leading or trailing whitespace)"
        )
    return value


# --- sudoers(5) ---------------------------------------------------------------------------


def sudoers_value(value: str, where: str = "value") -> str:
    """A sudoers ``Defaults name="value"`` string: double-quoted, with ``"`` and ``\\``
    backslash-escaped (sudoers(5): "Other special characters ... escaped with a backslash");
    control characters are refused."""
    _no_control(value, where)
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


# --- rsyslog (RainerScript) ----------------------------------------------------------------


def rainerscript_string(value: str | int, where: str = "value") -> str:
    """``value`` as one double-quoted RainerScript string constant (an rsyslog parameter value)
    that rsyslog reads back as exactly ``value`` (rsyslog's "String Constants": escapes as in
    C): ``\\`` and ``"`` backslash-escaped, and ``$``, which rsyslog reserves for variable
    expansion in double quotes (unescaped, it is a syntax error). Control characters are
    refused (``\\n`` and ``\\t`` would be written as escapes, but no value gpunode writes
    may hold one), and so is any non-ASCII character (rsyslog takes bytes, a reader of the
    config sees a look-alike)."""
    text = str(value)
    _no_control(text, where)
    if not text.isascii():
        raise ConfigError(
            f"{where}: {text!r} holds a non-ASCII character (allowed: printable ASCII only)"
        )
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'"{escaped}"'


# --- HAProxy (haproxy.cfg and its map files) ---------------------------------------------

# HAProxy splits a config line on whitespace, reads '#' as a comment, quotes and '\' as
# quoting, '$' as an environment variable (in double quotes), '%' as a log-format or sample
# expression, ',' and ')' as the end of a sample argument, a leading '-' as an ACL flag and
# '!', '{', '|' as ACL operators. A word is rendered bare, so only characters with none of
# these meanings pass: letters, digits and . _ / : @ + = -
_HAPROXY_WORD = re.compile(r"[A-Za-z0-9._/:@+=-]+")
_HAPROXY_WORD_HELP = "letters, digits and . _ / : @ + = - only, not starting with '-'"


def haproxy_word(value: str, where: str = "value") -> str:
    """``value`` as one bare word of haproxy.cfg or of a map file (a name, an ACL pattern,
    a map key or value, an argument in a sample expression's parentheses): refused unless
    it is made of characters HAProxy reads as plain text (:data:`_HAPROXY_WORD`), and
    refused when it starts with '-' (an ACL pattern would read it as a flag)."""
    _no_control(value, where)
    if not _HAPROXY_WORD.fullmatch(value) or value.startswith("-"):
        raise ConfigError(
            f"{where}: {value!r} cannot be written to HAProxy's configuration as one word "
            f"(allowed: {_HAPROXY_WORD_HELP}, not empty)"
        )
    return value


def haproxy_path(value: str, where: str = "path") -> str:
    """An absolute path as one haproxy.cfg word (a certificate, a map file, a socket): a
    :func:`haproxy_word` that starts with '/' (so no ``unix@``/``fd@`` address prefix), with
    no empty, "." or ".." segment."""
    haproxy_word(value, where)
    segments = value.split("/")[1:]
    if not value.startswith("/") or any(s in ("", ".", "..") for s in segments):
        raise ConfigError(
            f"{where}: {value!r} is not a plain absolute path (allowed: /dir/file, without "
            "empty, '.' or '..' segments)"
        )
    return value


def haproxy_string(value: str, where: str = "value") -> str:
    """``value`` as one single-quoted haproxy.cfg argument (a response body, a log format):
    HAProxy takes everything up to the next single quote literally (no escape, no variable),
    so a single quote is refused, and so are a backslash, '#', a control character and a
    non-ASCII character (which HAProxy would pass on, but no reader of a log line or a JSON
    body expects)."""
    _no_control(value, where)
    bad = sorted({c for c in value if c in "'\\#" or not c.isascii()})
    if bad:
        raise ConfigError(
            f"{where}: {value!r} holds {''.join(bad)!r}, which cannot be written in a "
            "single-quoted HAProxy argument (allowed: printable ASCII except ' \\ #)"
        )
    return f"'{value}'"


def haproxy_address(address: str, port: int, where: str = "address") -> str:
    """``address:port`` for a ``bind`` or ``server`` line: the address must be an IP
    address (an IPv6 one is written with an ``ipv6@`` prefix, so its colons are not read as
    the port separator), the port 1-65535."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ConfigError(
            f"{where}: {address!r} is not an IP address (allowed: e.g. 127.0.0.1 or ::1)"
        ) from None
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{where}: port {port!r} (allowed: 1-65535)")
    if ip.version == 6:
        return f"ipv6@{ip.compressed}:{port}"
    return f"{ip.compressed}:{port}"


def haproxy_map_line(key: str, value: str, where: str = "map") -> str:
    """One line of an HAProxy map file, ``<key> <value>``: both :func:`haproxy_word` (a
    map key ends at the first whitespace and a line starting with '#' is a comment)."""
    return f"{haproxy_word(key, f'{where} key')} {haproxy_word(value, f'{where} value')}\n"
