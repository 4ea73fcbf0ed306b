"""gpunode's configuration: one schema, validated as a whole before any host is touched.

Every key, its type and its default are in gpunode/schema/ (docs/reference.md lists
them all). An inventory
YAML file has three layers of node settings that are deep-merged per host
(lists replace, mappings merge): ``defaults`` < each of the host's ``groups``
(in the order listed) < the host's own ``data``.

Example (``inventories/example.yml``)::

    defaults:
      distro: debian12
      base:
        ntp_servers: [time.example.net]
    groups:
      gpu_nodes:
        data:
          gpu: {required: true}
    hosts:
      gpu-01:
        connection: {address: 192.0.2.11, user: root}
        groups: [gpu_nodes]

Bad input raises :class:`ConfigError` whose message names the file, the host
or group, the key and what is allowed.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from gpunode import base as base_checks
from gpunode import (
    firewall,
    gateway,
    gpus,
    hardening,
    inference,
    monitoring,
    nomad,
    nvidia,
    secrets,
)
from gpunode.schema.distros import DISTROS
from gpunode.schema.node import (
    RESERVED_GROUPS,
    Connection,
    Host,
    Inventory,
    InventoryFile,
    NodeConfig,
)
from gpunode.schema.types import HOSTNAME_RE, PATTERN_HELP, ConfigError

# Each concern checks what needs the whole merged config (and the host's connection) in
# its own check_host(where, config, connection) -> [problems].
SECTION_CHECKS = (
    base_checks,
    nvidia,
    gpus,
    hardening,
    firewall,
    secrets,
    inference,
    gateway,
    nomad,
    monitoring,
)

# --- loading -----------------------------------------------------------------


# Bounds on an inventory file, checked before and while it is parsed, so that a hostile or
# broken file ends in an error naming it, in bounded time and memory: its size in bytes
# (the example inventory is 5 kB; a fleet of a thousand hosts stays well under 1 MB) and
# how deep mappings and lists nest (an inventory needs fewer than 10 levels).
MAX_FILE_BYTES = 4 * 2**20
MAX_DEPTH = 64


class _InventoryLoader(yaml.SafeLoader):
    """A SafeLoader (no Python tags) that refuses what YAML allows but an inventory must not
    hold: a key twice in one mapping (PyYAML keeps the last silently), a key that is not a
    string, and nesting deeper than MAX_DEPTH. Merge keys (``<<: *base``) still work, and a
    key written next to them overrides the merged one."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"mappings and lists nest more than {MAX_DEPTH} levels deep (allowed: at "
                    f"most {MAX_DEPTH})",
                    self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)  # type: ignore[no-untyped-call]
        finally:
            self._depth -= 1


def _construct_mapping(
    loader: _InventoryLoader, node: yaml.MappingNode, deep: bool = False
) -> dict:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<`: flatten_mapping merges it; the keys written here win
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        if not isinstance(key, str):
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"the key {_shown(key)} is a {type(key).__name__}, not a string (allowed: "
                "string keys; quote a key that YAML reads as a number, a boolean or null)",
                key_node.start_mark,
            )
        if key in seen:
            first = seen[key].start_mark
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first defined on line {first.line + 1}; "
                "allowed: each key once per mapping, e.g. each host once)",
                key_node.start_mark,
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_InventoryLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,  # type: ignore[arg-type]
)


def _check_depth(root: yaml.Node | None) -> None:
    """Aliases nest too: ``a2: &a2 [*a1]``, ``a3: &a3 [*a2]``, ... builds a deep value from a
    flat file, and ``&a [*a]`` a value that holds itself. Refuse both before constructing."""
    depth: dict[int, int] = {}  # id(node) -> levels below it (itself included)
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)] if root is not None else []
    while stack:
        node, done = stack.pop()
        children = _children(node)
        if done:
            open_nodes.discard(id(node))
            depth[id(node)] = 1 + max((depth[id(c)] for c in children), default=0)
            if depth[id(node)] > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"mappings and lists nest more than {MAX_DEPTH} levels deep, counting "
                    f"aliases (allowed: at most {MAX_DEPTH})",
                    node.start_mark,
                )
            continue
        if id(node) in depth:
            continue
        open_nodes.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in open_nodes:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    "an alias refers to a node that contains it (allowed: aliases of "
                    "complete nodes, no cycles)",
                    child.start_mark,
                )
            if id(child) not in depth:
                stack.append((child, False))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def read_yaml(path: str | Path) -> Any:
    """One YAML document from a file: at most MAX_FILE_BYTES of UTF-8, safe tags only, each
    key once, nested at most MAX_DEPTH levels. Anything else raises ConfigError naming the
    file."""
    path = Path(path)
    try:
        with path.open("rb") as stream:
            raw = stream.read(MAX_FILE_BYTES + 1)  # a FIFO or /dev/zero reads no further
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read inventory data: {exc.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(
            f"{path}: the file is larger than {MAX_FILE_BYTES // 2**20} MiB (allowed: an "
            f"inventory of at most {MAX_FILE_BYTES} bytes)"
        )
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"{path}: the file is UTF-16 (allowed: UTF-8 text)")
    text = decode_utf8(path, raw)
    loader = _InventoryLoader(text)
    loader.name = str(path)  # marks (line, column) name the file
    try:
        node = loader.get_single_node()
        _check_depth(node)
        data = None if node is None else loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: YAML error: {exc}") from None
    except RecursionError:  # a bound above should stop it first: never a traceback
        raise ConfigError(
            f"{path}: YAML error: nested too deeply (allowed: at most {MAX_DEPTH} levels)"
        ) from None
    finally:
        loader.dispose()
    if data is None:
        raise ConfigError(
            f"{path}: the file is empty (allowed: a mapping with keys defaults, groups, hosts)"
        )
    return data


def decode_utf8(path: Path | str, raw: bytes) -> str:
    """A file's bytes as UTF-8 text (a BOM dropped), or an error naming the line of the
    first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: line {line}: byte {raw[exc.start]:#04x} is not UTF-8 (allowed: UTF-8 text)"
        ) from None


def load_file(path: str | Path) -> Inventory:
    """Read and validate one inventory YAML file."""
    return load(read_yaml(path), source=str(path))


def load(raw: Any, source: str) -> Inventory:
    """Validate a whole inventory document; raise ConfigError listing every problem."""
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"{source}: the inventory must be a mapping with keys defaults, groups, hosts "
            f"(got {type(raw).__name__})"
        )
    try:
        inv = InventoryFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format(source, "inventory", exc, InventoryFile)) from None

    problems: list[str] = []
    for gname in inv.groups:
        if gname in RESERVED_GROUPS:
            problems.append(
                f"{source}: group {gname}: the name is pyinfra's own "
                f"(allowed: any other name than {', '.join(sorted(RESERVED_GROUPS))})"
            )
    # Each layer alone must be valid node config, so errors name the layer they are in.
    problems += _check_layer(source, "defaults", inv.defaults)
    for gname, group in inv.groups.items():
        problems += _check_layer(source, f"group {gname}", group.data)
    for hname, entry in inv.hosts.items():
        problems += _check_layer(source, f"host {hname}", entry.data)
        for gname in entry.groups:
            if gname not in inv.groups:
                allowed = ", ".join(inv.groups) or "none are defined"
                problems.append(
                    f"{source}: host {hname}: groups: group {gname!r} does not exist "
                    f"(allowed: groups defined under 'groups:': {allowed})"
                )
        twice = sorted({g for g in entry.groups if entry.groups.count(g) > 1})
        if twice:
            problems.append(
                f"{source}: host {hname}: groups: {', '.join(twice)} listed twice "
                "(allowed: each group once)"
            )
    seen_addr: dict[tuple[str, int], str] = {}
    for hname, entry in inv.hosts.items():
        key = (entry.connection.address.lower(), entry.connection.port)
        if key in seen_addr:
            problems.append(
                f"{source}: host {hname}: connection.address: {key[0]}:{key[1]} is already host "
                f"{seen_addr[key]} (allowed: each host once)"
            )
        seen_addr.setdefault(key, hname)
    if problems:
        raise ConfigError("\n".join(problems))

    hosts: dict[str, Host] = {}
    for hname, entry in inv.hosts.items():
        merged: dict[str, Any] = {}
        for layer in [inv.defaults, *(inv.groups[g].data for g in entry.groups), entry.data]:
            merged = _deep_merge(merged, layer)
        try:
            config = NodeConfig.model_validate(merged)
        except ValidationError as exc:
            problems.append(_format(source, f"host {hname} (merged)", exc, NodeConfig))
            continue
        problems += _check_host(source, hname, config)
        problems += _check_listeners(f"{source}: host {hname}", config, entry.connection)
        for section in SECTION_CHECKS:
            problems += section.check_host(f"{source}: host {hname}", config, entry.connection)
        hosts[hname] = Host(
            name=hname, groups=tuple(entry.groups), connection=entry.connection, config=config
        )
    if problems:
        raise ConfigError("\n".join(problems))
    problems, hosts = gateway.link(source, hosts)  # gateways in front of other nodes
    if problems:
        raise ConfigError("\n".join(problems))

    groups: dict[str, tuple[str, ...]] = {g: () for g in inv.groups}
    ungrouped = tuple(h for h, e in inv.hosts.items() if not e.groups)
    for hname, entry in inv.hosts.items():
        for gname in entry.groups:
            groups[gname] += (hname,)
    if ungrouped:
        groups["ungrouped"] = ungrouped
    return Inventory(source=source, hosts=hosts, groups=groups)


def _check_layer(source: str, where: str, data: Mapping[str, Any]) -> list[str]:
    try:
        NodeConfig.model_validate(data)
    except ValidationError as exc:
        return [_format(source, where, exc, NodeConfig)]
    return []


def _check_host(source: str, hname: str, config: NodeConfig) -> list[str]:
    problems = []
    where = f"{source}: host {hname}"
    if config.distro is None:
        problems.append(f"{where}: distro: not set (allowed: {', '.join(DISTROS)})")
        return problems
    spec = DISTROS[config.distro]
    if config.base.apt_mirror and spec.family != "apt":
        problems.append(
            f"{where}: base.apt_mirror: only apt distros use an apt mirror, {config.distro} uses "
            "dnf (allowed: unset it; point dnf at a mirror with your own repo files)"
        )
    if config.base.hostname is None and not re.fullmatch(HOSTNAME_RE, hname):
        problems.append(
            f"{where}: base.hostname: not set and the inventory name {hname!r} is not a valid "
            "hostname (allowed: set base.hostname, lowercase letters, digits and '-')"
        )
    return problems


def listeners(config: NodeConfig, connection: Connection) -> list[tuple[str, int]]:
    """(key, port) of every TCP/UDP port something gpunode sets up listens on, on one node:
    SSH, the exporters, the Nomad agent and the inference services (a firewall rule in
    `firewall.extra_input` opens a port, it does not listen on one)."""
    found = [("connection.port", connection.port)]
    mon = config.monitoring
    if mon.node_exporter:
        found.append(("monitoring.node_exporter_port", mon.node_exporter_port))
    if mon.dcgm_exporter is not False:
        found.append(("monitoring.dcgm_exporter_port", mon.dcgm_exporter_port))
    for port in sorted({port for _, port in nomad.cluster_ports(config)}):
        found.append((f"nomad.enabled (the Nomad agent's port {port})", port))
    for name, svc in config.inference.services.items():
        at = f"inference.services.{name}"
        found.append((f"{at}.port", svc.port))
        if (grpc := svc.effective_grpc_port()) is not None:
            found.append((f"{at}.grpc_port", grpc))
        if svc.effective_metrics_port() != svc.port:
            found.append((f"{at}.metrics_port", svc.effective_metrics_port()))
    if config.gateway.enabled:
        found.append(("gateway.port", config.gateway.port))
        found.append(("gateway.metrics_port", config.gateway.metrics_port))
    return found


def _check_listeners(where: str, config: NodeConfig, connection: Connection) -> list[str]:
    """Two listeners on one port: refused, naming both keys. Ports of one concern among
    themselves are that concern's check_host (its messages say more)."""
    problems = []
    seen: dict[int, str] = {}
    for key, port in listeners(config, connection):
        other = seen.setdefault(port, key)
        if other == key or other.split(".")[0] == key.split(".")[0]:
            continue
        if other == "connection.port":
            problems.append(
                f"{where}: {key}: {port} is the SSH port (connection.port; allowed: any other port)"
            )
        else:
            problems.append(
                f"{where}: {key}: {port} is already used by {other} (allowed: a port no other "
                "listener on the node uses)"
            )
    return problems


def _deep_merge(left: Mapping[str, Any], right: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(left)
    for key, value in right.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# At most this many problems per layer, each showing at most SHOWN characters of its value:
# a hostile file (a YAML alias bomb, say) still gets a short, readable error.
MAX_PROBLEMS = 30
SHOWN = 80


_REPR = reprlib.Repr()  # Python 3.11's Repr takes its limits as attributes
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 3, 8, 8, 8
_REPR.maxstring = _REPR.maxother = SHOWN


def _shown(value: Any) -> str:
    """``repr`` of a value, bounded in size and in the time it takes."""
    text = _REPR.repr(value)
    return text if len(text) <= SHOWN else f"{text[: SHOWN - 3]}..."


def _format(source: str, where: str, exc: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    errors = exc.errors()
    for err in errors[:MAX_PROBLEMS]:
        loc = tuple(err["loc"])
        here = where
        if model is InventoryFile and len(loc) >= 2 and loc[0] in ("hosts", "groups"):
            here = f"{str(loc[0])[:-1]} {_part(loc[1])}"  # "host gpu-01" / "group gpu_nodes"
            key = _loc(loc[2:])
        else:
            key = _loc(loc)
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1])
            msg = f"unknown key (allowed: {', '.join(allowed)})"
        elif err["type"] == "string_pattern_mismatch":
            pattern = err.get("ctx", {}).get("pattern", "")
            help_ = PATTERN_HELP.get(pattern, pattern)
            msg = f"{_shown(err['input'])} is not allowed (allowed: {help_})"
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            hint = _allowed_hint(err)
            if err["type"] in ("int_parsing", "int_type"):
                hint = f"an integer{_int_bounds(model, loc)}"
            if hint and "allowed:" not in msg:
                msg = f"{msg} (allowed: {hint})"
            if err["type"] not in ("value_error", "assertion_error") and "input" in err:
                msg = f"{_shown(err['input'])}: {msg}"
        lines.append(f"{source}: {here}: {key or '(top level)'}: {_cut(msg)}")
    if len(errors) > MAX_PROBLEMS:
        lines.append(f"{source}: {where}: ... and {len(errors) - MAX_PROBLEMS} more problems")
    return "\n".join(lines)


def _cut(msg: str) -> str:
    """A validator's message bounded in size: a check that quotes the whole value it refuses
    (100 kB, say) keeps its start and its "(allowed: ...)" clause."""
    limit = 600
    if len(msg) <= limit:
        return msg
    allowed = msg.rfind("(allowed:")
    tail = msg[allowed:] if 0 <= allowed and len(msg) - allowed < limit // 2 else ""
    return f"{msg[: limit - len(tail) - 4]}... {tail}"


def _allowed_hint(err: Any) -> str | None:
    """What is allowed, for pydantic's own error types (its messages say only what is wrong)."""
    ctx = err.get("ctx", {})
    kind = err["type"]
    if kind == "literal_error":
        return str(ctx.get("expected", "")).replace(" or ", ", ")
    if kind in ("less_than_equal", "greater_than_equal", "less_than", "greater_than"):
        bounds = {
            "less_than_equal": "at most",
            "greater_than_equal": "at least",
            "less_than": "below",
            "greater_than": "above",
        }
        limit = next(iter(ctx.values()), "?")
        return f"a number {bounds[kind]} {limit}"
    if kind == "string_too_long":
        return f"a string of at most {ctx.get('max_length', '?')} characters"
    if kind in ("too_short", "too_long"):
        word = "at least" if kind == "too_short" else "at most"
        count = ctx.get("min_length" if kind == "too_short" else "max_length", "?")
        return f"a list of {word} {count} item(s)"
    return {
        "int_parsing": "an integer",
        "int_type": "an integer",
        "bool_parsing": "true or false",
        "bool_type": "true or false",
        "float_type": "a number",
        "float_parsing": "a number",
        "list_type": "a list, e.g. [a, b]",
        "dict_type": "a mapping of key: value",
        "model_type": "a mapping of key: value",
        "model_attributes_type": "a mapping of key: value",
        "string_type": "a string",
    }.get(kind)


def _int_bounds(model: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    """The bounds of the integer field at ``loc``, from its ``Field(ge=..., le=...)``: e.g.
    ``" from 1 to 65535"``, ``" of at least 0"``; ``""`` where it has none."""
    annotation: Any = model
    field = None
    for part in loc:
        if isinstance(part, str) and (
            part.startswith(("function-", "union[", "literal[")) or part in _PYDANTIC_BRANCHES
        ):
            continue  # pydantic's own branch names, as in _loc
        annotation = _unwrap(annotation)
        origin = getattr(annotation, "__origin__", None)
        if origin in (dict, list):
            annotation, field = annotation.__args__[-1], None
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            if field is None:
                return ""
            annotation = field.annotation
        else:
            return ""
    if field is None:
        return ""
    constraints = list(field.metadata)
    for arg in get_args(field.annotation):  # X | None: X's own Annotated constraints
        for meta in getattr(arg, "__metadata__", ()):
            constraints += getattr(meta, "metadata", [meta])
    low = next((c.ge for c in constraints if getattr(c, "ge", None) is not None), None)
    high = next((c.le for c in constraints if getattr(c, "le", None) is not None), None)
    if low is not None and high is not None:
        return f" from {low} to {high}"
    if low is not None:
        return f" of at least {low}"
    if high is not None:
        return f" of at most {high}"
    return ""


def _loc(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("function-", "union[", "literal[")) or part in _PYDANTIC_BRANCHES:
            continue  # pydantic's internal union/validator branch names
        elif part == "[key]":
            out += ".(name)" if out else "(name)"  # the mapping key itself is what is wrong
        else:
            out += f".{_part(part)}" if out else _part(part)
    return out


def _part(part: int | str) -> str:
    """A key as a message shows it: as written when it is plain, else quoted and cut short
    (a hostile key must not add a line, a terminal escape or 100 kB to the message)."""
    text = str(part)
    return text if re.fullmatch(r"[A-Za-z0-9_.:/@+-]{1,80}", text) else _shown(text)


_PYDANTIC_BRANCHES = {"int", "str", "list", "IPv4Network", "IPv6Network", "constrained-str"}


def _allowed_keys(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """Field names of the model found at ``loc`` (walking models, dicts and lists)."""
    annotation: Any = model
    for part in loc:
        annotation = _unwrap(annotation)
        origin = getattr(annotation, "__origin__", None)
        if origin is dict:
            annotation = annotation.__args__[1]
        elif origin is list:
            annotation = annotation.__args__[0]
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            if field is None:
                return ["(no keys here)"]
            annotation = field.annotation
        else:
            return ["(no keys here)"]
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return sorted(annotation.model_fields)
    return ["(no keys here)"]


def _unwrap(annotation: Any) -> Any:
    """Optional[X] / X | None -> X."""
    args = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
    if getattr(annotation, "__origin__", None) in (dict, list):
        return annotation
    if len(args) == 1 and type(None) in getattr(annotation, "__args__", ()):
        return args[0]
    return annotation
