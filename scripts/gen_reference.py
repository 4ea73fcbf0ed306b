#!/usr/bin/env python3
"""Generate docs/reference.md, the key-by-key reference of the inventory format, from the
models in gpunode/schema/ (their class docstrings and field docstrings, types and defaults).

    python scripts/gen_reference.py            # print the reference to stdout
    python scripts/gen_reference.py --write    # write docs/reference.md
    python scripts/gen_reference.py --check    # exit 1 with a diff when docs/reference.md is stale

It imports only gpunode.schema, pydantic and the standard library, and its output depends
only on them: the same schema gives the same bytes. tests/unit/test_reference.py runs
``--check``, so a schema change without a regenerated reference fails the tests.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import ipaddress
import json
import re
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "reference.md"
sys.path.insert(0, str(ROOT))  # this checkout's gpunode, installed or not

from pydantic import AfterValidator, BaseModel, BeforeValidator, StringConstraints  # noqa: E402
from pydantic.fields import FieldInfo  # noqa: E402

from gpunode.schema import types as schema_types  # noqa: E402
from gpunode.schema.gpu import GPU_MODELS, Gpu  # noqa: E402
from gpunode.schema.node import InventoryFile, NodeConfig  # noqa: E402
from gpunode.schema.nvidia import CUDA_VERSIONS, DRIVER_BRANCHES, Cuda, Nvidia  # noqa: E402
from gpunode.schema.planner import DTYPES, KV_DTYPES, ModelFootprint  # noqa: E402

# Fields whose allowed values a validator checks against a table (the field is a plain str).
CHOICES: dict[tuple[type[BaseModel], str], tuple[str, ...]] = {
    (Nvidia, "branch"): tuple(DRIVER_BRANCHES),
    (Cuda, "version"): CUDA_VERSIONS,
    (Gpu, "model"): tuple(GPU_MODELS),
    (ModelFootprint, "dtype"): tuple(DTYPES),
    (ModelFootprint, "kv_dtype"): KV_DTYPES,
}

# What a validator function adds to a type's wording, by its module and qualified name.
VALIDATOR_NOTES = {
    "gpunode.schema.types._plain_segments": "no `.` or `..` segment",
    "gpunode.schema.planner.parse_parameters": "or a number with a suffix: 7B, 6.74B, 135M",
    "gpunode.schema.vault._service": "or a string: the `name` alone",
}
# Validators that check a regular expression of their own.
VALIDATOR_PATTERNS = {"gpunode.schema.types._image": schema_types.IMAGE_RE}

# The placeholder a mapping's keys get in a dotted key (default: <name>).
PLACEHOLDERS = {"hosts": "<host>", "groups": "<group>", "inference.runtimes": "<runtime>"}

# Keys that hold node settings (the sections of this reference), not a model of their own.
NODE_SETTINGS = ("defaults", "groups.<group>.data", "hosts.<host>.data")

CIDR = (
    "network in CIDR notation, IPv4 or IPv6, with no host bits set (e.g. 10.0.0.0/24 or "
    "2001:db8::/64)"
)


@dataclass(frozen=True)
class Row:
    key: str
    type: str
    default: str
    description: str


# --- text -----------------------------------------------------------------------------------


def paragraphs(doc: str | None) -> list[str]:
    """A docstring as Markdown paragraphs: one line each, rst ``literals`` as `code`."""
    text = inspect.cleandoc(doc or "").replace("``", "`")
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def escape(text: str) -> str:
    """Markdown for a table cell or a paragraph: `|` escaped everywhere, `*` and `<` outside
    code spans (they would start emphasis or an HTML tag)."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for part in parts:
        if not part.startswith("`"):
            part = part.replace("*", r"\*").replace("<", r"\<")
        out.append(part.replace("|", r"\|"))
    return "".join(out)


def code(value: str) -> str:
    return f"`{value}`"


def literal(value: Any) -> str:
    return code(value if isinstance(value, str) else json.dumps(value))


# --- types ----------------------------------------------------------------------------------


def unwrap(tp: Any, meta: list[Any]) -> tuple[Any, list[Any]]:
    """Annotated[X, ...] -> X and its metadata (a Field()'s constraints included)."""
    meta = list(meta)
    while get_origin(tp) is typing.Annotated:
        tp, *extra = get_args(tp)
        meta += extra
    flat: list[Any] = []
    for item in meta:
        flat += item.metadata if isinstance(item, FieldInfo) else [item]
    return tp, flat


def validator_name(item: Any) -> str | None:
    if isinstance(item, AfterValidator | BeforeValidator):
        func = item.func
        return f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', '')}"
    return None


def bounds(meta: list[Any]) -> str:
    found = {
        name: getattr(item, name)
        for item in meta
        for name in ("ge", "gt", "le", "lt")
        if getattr(item, name, None) is not None
    }
    if "ge" in found and "le" in found:
        return f" {found['ge']}..{found['le']}"
    words = {"gt": "above", "ge": "at least", "lt": "below", "le": "at most"}
    return "".join(
        f"{',' if i else ''} {words[name]} {found[name]}"
        for i, name in enumerate(n for n in words if n in found)
    )


def string_text(meta: list[Any]) -> str:
    """ "string (wording; notes)" for a pattern with wording in PATTERN_HELP, else "string
    matching `regex` (notes)"."""
    patterns = [item.pattern for item in meta if isinstance(item, StringConstraints)]
    notes = []
    for item in meta:
        name = validator_name(item)
        if name in VALIDATOR_PATTERNS:
            patterns.append(VALIDATOR_PATTERNS[name])
        elif name in VALIDATOR_NOTES:
            notes.append(VALIDATOR_NOTES[name])
    text = "string"
    for pattern in patterns:
        if isinstance(pattern, str) and pattern in schema_types.PATTERN_HELP:
            notes.insert(0, schema_types.PATTERN_HELP[pattern])
        elif pattern is not None:
            text += f" matching {code(str(pattern))}"
    return text + (f" ({'; '.join(notes)})" if notes else "")


def type_text(tp: Any, meta: list[Any], choices: tuple[str, ...] | None = None) -> str:
    """A type in words: "integer 1..65535", "list of string (...)", "one of `a`, `b`"."""
    tp, meta = unwrap(tp, meta)
    notes = [VALIDATOR_NOTES[n] for n in map(validator_name, meta) if n in VALIDATOR_NOTES]
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        args = [unwrap(a, [])[0] for a in get_args(tp)]
        if {a for a in args if a is not type(None)} <= {
            ipaddress.IPv4Network,
            ipaddress.IPv6Network,
        }:
            return CIDR
        values = [a for a in get_args(tp) if a is not type(None)]
        literals = [v for a in values if get_origin(a) is Literal for v in get_args(a)]
        nullable = type(None) in args
        if choices is not None:
            return "one of " + ", ".join(map(literal, choices)) + (", `null`" if nullable else "")
        if len(literals) > 1 and all(get_origin(a) is Literal for a in values):
            return "one of " + ", ".join(map(literal, literals)) + (", `null`" if nullable else "")
        parts = [type_text(a, []) for a in values]
        return " or ".join(parts) + (" or null" if nullable else "")
    if origin is Literal:
        if len(get_args(tp)) == 1:
            return literal(get_args(tp)[0])
        return "one of " + ", ".join(map(literal, get_args(tp)))
    if choices is not None:
        return "one of " + ", ".join(map(literal, choices))
    if tp is bool:
        text = "boolean"
    elif tp is int:
        text = "integer" + bounds(meta)
    elif tp is float:
        text = "number" + bounds(meta)
    elif tp is str:
        return string_text(meta)
    elif origin is list:
        (item,) = get_args(tp)
        text = "list of " + type_text(item, [])
        least = [getattr(m, "min_length", None) for m in meta]
        if any(n is not None for n in least):
            text += f" (at least {max(n for n in least if n is not None)})"
        return text
    elif origin is dict:
        key, value = get_args(tp)
        return f"mapping of {type_text(key, [])} to {type_text(value, [])}"
    elif isinstance(tp, type) and issubclass(tp, BaseModel):
        text = "mapping (keys below)"
    elif tp is Any:
        text = "any value"
    else:
        text = getattr(tp, "__name__", str(tp))
    return text + "".join(f", {note}" for note in notes)


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        if value == type(value)():
            return code("{}")
        value = value.model_dump(mode="json")
    return code(json.dumps(value, ensure_ascii=False))


# --- walking the models ---------------------------------------------------------------------


def nested(tp: Any, key: str) -> Iterator[tuple[type[BaseModel], str]]:
    """The models inside a field's type, with the dotted key their fields hang under."""
    tp, _ = unwrap(tp, [])
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            yield from nested(arg, key)
    elif origin is list:
        yield from nested(get_args(tp)[0], f"{key}[]")
    elif origin is dict:
        yield from nested(get_args(tp)[1], f"{key}.{PLACEHOLDERS.get(key, '<name>')}")
    elif isinstance(tp, type) and issubclass(tp, BaseModel):
        yield tp, key


def describe(*docs: str | None) -> str:
    """Docstrings as one line; one that another of them already says is left out."""
    kept: list[str] = []
    for text in (" ".join(paragraphs(doc)) for doc in docs):
        said = text.lower().rstrip(".")
        if not text or any(said in k.lower() for k in kept):
            continue
        kept = [k for k in kept if k.lower().rstrip(".") not in text.lower()]
        kept.append(text)
    return " ".join(kept)


def field_row(model: type[BaseModel], name: str, key: str, top: bool = False) -> Row:
    """A field's row. A field holding a model also gets that model's class docstring (first:
    what it is), except at the top of a section, whose intro it is."""
    field = model.model_fields[name]
    if key in NODE_SETTINGS:
        kind = "mapping of node settings (the sections below)"
    else:
        kind = type_text(field.annotation, list(field.metadata), CHOICES.get((model, name)))
    inner = [] if top else [sub.__doc__ for sub, _ in nested(field.annotation, key)]
    return Row(key, kind, default_text(field), describe(*inner, field.description))


def rows(model: type[BaseModel], prefix: str = "") -> Iterator[Row]:
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        yield field_row(model, name, key)
        for sub, sub_key in nested(field.annotation, key):
            yield from rows(sub, sub_key)


def table(found: Iterator[Row]) -> list[str]:
    lines = ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    for row in found:
        cells = (code(row.key), row.type, row.default, row.description)
        lines.append("| " + " | ".join(escape(c) for c in cells) + " |")
    return lines


# --- the document ---------------------------------------------------------------------------


def render() -> str:
    out = [
        "<!-- Generated by scripts/gen_reference.py from gpunode/schema/: do not edit by hand. -->",
        "",
        "# Configuration reference",
        "",
        "> Generated by `scripts/gen_reference.py` from the models in `gpunode/schema/`: do not "
        "edit by hand. After changing the schema, run `python scripts/gen_reference.py --write`.",
        "",
        "Every key of an inventory YAML file, with its type, default and allowed values. How the "
        "file is put together is explained in [inventory.md](inventory.md).",
        "",
        "- A key is a dotted path from the top of its section. `<name>` (`<host>`, `<group>`, "
        "`<runtime>`) stands for a key you choose in a mapping; `[]` stands for each item of "
        "a list.",
        "- Defaults are written as JSON, which is also YAML. `{}` for a mapping means every key "
        "below it has its default; `null` means unset.",
        "- *required*: the key must be given whenever the mapping that holds it is.",
        "- Checks that need more than one key (done when the configuration is loaded) are named "
        "in the descriptions.",
        "",
        "## Inventory file",
        "",
    ]
    for para in paragraphs(InventoryFile.__doc__):
        out += [escape(para), ""]
    out += [*table(rows(InventoryFile)), ""]

    out += ["## Node settings", ""]
    for para in paragraphs(NodeConfig.__doc__):
        out += [escape(para), ""]
    out += [
        "They go under `defaults`, `groups.<group>.data` and `hosts.<host>.data`; one section "
        "per key:",
        "",
    ]
    out += [f"- [`{name}`](#{name})" for name in NodeConfig.model_fields]
    out.append("")

    for name, field in NodeConfig.model_fields.items():
        out += [f"### `{name}`", ""]
        intro = [sub for sub, key in nested(field.annotation, name)]
        for para in paragraphs(intro[0].__doc__ if intro else None):
            out += [escape(para), ""]
        found = iter(
            [field_row(NodeConfig, name, name, top=True), *rows_under(field.annotation, name)]
        )
        out += [*table(found), ""]
    return "\n".join(out).rstrip("\n") + "\n"


def rows_under(tp: Any, key: str) -> Iterator[Row]:
    for sub, sub_key in nested(tp, key):
        yield from rows(sub, sub_key)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write docs/reference.md")
    mode.add_argument(
        "--check", action="store_true", help="exit 1 with a diff when docs/reference.md differs"
    )
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        REFERENCE.write_text(text, encoding="utf-8")
        print(f"wrote {REFERENCE.relative_to(ROOT)}", file=sys.stderr)
        return 0
    if args.check:
        current = REFERENCE.read_text(encoding="utf-8") if REFERENCE.exists() else ""
        if current == text:
            return 0
        diff = difflib.unified_diff(
            current.splitlines(keepends=True),
            text.splitlines(keepends=True),
            "docs/reference.md",
            "scripts/gen_reference.py output",
        )
        sys.stdout.writelines(diff)
        print(
            "docs/reference.md is stale: run `python scripts/gen_reference.py --write`",
            file=sys.stderr,
        )
        return 1
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
