"""No string in the configuration holds a control character: every field of every model
(walked from the models, so a field added tomorrow is covered), its list items and its
mapping keys refuse a newline, NUL, escape, DEL, a C1 control and the Unicode line
separator, with an error naming the key. A newline in an ssh_config path or a dnf.conf
proxy line would otherwise become a new option for the program reading it."""

from __future__ import annotations

import typing
from collections.abc import Iterator
from types import UnionType
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from gpunode.config import load
from gpunode.schema.node import InventoryFile, NodeConfig
from gpunode.schema.types import ConfigError

# Fields whose own validator runs first and refuses every value outside a table.
FROM_A_TABLE = {"Nvidia.branch", "Cuda.version", "Gpu.model"}

HOSTILE = ["a\nb", "a\rb", "a\x00b", "a\x1b[31mb", "a\x7fb", "a\x85b", "a\u2028b", "\t"]


def models(root: type[BaseModel]) -> Iterator[type[BaseModel]]:
    seen: set[type[BaseModel]] = set()

    def walk(annotation: Any) -> Iterator[type[BaseModel]]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation not in seen:
                seen.add(annotation)
                yield annotation
                for field in annotation.model_fields.values():
                    yield from walk(field.annotation)
            return
        for arg in typing.get_args(annotation):
            yield from walk(arg)

    yield from walk(root)


def _shape(annotation: Any) -> str:
    """'section' (a nested model), 'mapping', 'list' or 'scalar'."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _shape(typing.get_args(annotation)[0])
    if origin in (typing.Union, UnionType):
        shapes = {_shape(a) for a in typing.get_args(annotation) if a is not type(None)}
        return "section" if "section" in shapes else sorted(shapes)[0]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if origin is dict:
        return "mapping"
    if origin in (list, tuple):
        return "list"
    return "scalar"


FIELDS = [
    (model, name, _shape(field.annotation))
    for root in (InventoryFile, NodeConfig)
    for model in models(root)
    for name, field in model.model_fields.items()
    if name not in getattr(model, "RAW_LAYERS", ())
]


def test_the_walk_reaches_every_section() -> None:
    names = {model.__name__ for model, _, _ in FIELDS}
    assert {"Connection", "Base", "AdminUser", "Secret", "Service", "NomadJob"} <= names
    assert len(FIELDS) > 200


@pytest.mark.parametrize(
    ("model", "name", "shape"),
    [f for f in FIELDS if f[2] != "section"],
    ids=[f"{m.__name__}.{n}" for m, n, s in FIELDS if s != "section"],
)
def test_every_field_refuses_control_characters(
    model: type[BaseModel], name: str, shape: str
) -> None:
    for text in HOSTILE:
        value: Any = {"scalar": text, "list": [text], "mapping": {text: "x"}}[shape]
        with pytest.raises(ValidationError) as err:
            model.model_validate({name: value})
        mine = [e for e in err.value.errors() if e["loc"][:1] == (name,)]
        assert mine, (text, err.value.errors())
        if f"{model.__name__}.{name}" in FROM_A_TABLE:
            assert "gpunode knows" in mine[0]["msg"]  # not in the table: refused all the same
        else:
            assert "control character" in mine[0]["msg"], (text, err.value.errors())


def test_mapping_values_and_keys_of_a_section_are_checked() -> None:
    """A dict of plain strings (nomad.images) has its values checked, not only its keys."""
    with pytest.raises(ValidationError, match="control character"):
        NodeConfig.model_validate({"nomad": {"images": {"vllm": "x\ny"}}})


def test_the_loader_names_file_host_and_key() -> None:
    raw = {
        "defaults": {"distro": "debian12"},
        "hosts": {"gpu-01": {"connection": {"address": "192.0.2.1", "key_file": "~/k\nx"}}},
    }
    with pytest.raises(ConfigError) as err:
        load(raw, "inv.yml")
    assert str(err.value).startswith("inv.yml: host gpu-01: connection.key_file: ")
    assert "control character '\\n'" in str(err.value)


def test_look_alike_letters_are_refused() -> None:
    """A Cyrillic 'а' reads as a Latin 'a' in a review: every string is ASCII."""
    with pytest.raises(ValidationError, match=r"non-ASCII character 'а' \(U\+0430\)"):
        NodeConfig.model_validate({"vault": {"namespace": "tаem-ml"}})
    config = NodeConfig.model_validate({"vault": {"namespace": "team-ml/unit"}})
    assert config.vault.namespace == "team-ml/unit"


def test_urls_refuse_a_backslash() -> None:
    """A backslash continues a line in dnf.conf and escapes in shells: never in a URL."""

    def with_proxy(url: str) -> dict[str, Any]:
        return {
            "defaults": {
                "distro": "rocky9",
                "firewall": {"enabled": False},
                "base": {"apt_proxy": url},
            },
            "hosts": {"gpu-01": {"connection": {"address": "192.0.2.1"}}},
        }

    with pytest.raises(ConfigError) as err:
        load(with_proxy("http://proxy.example.com:3128\\"), "inv.yml")
    assert str(err.value).startswith("inv.yml: defaults: base.apt_proxy: ")
    assert "no user:password@, spaces, quotes, backslash" in str(err.value)
    good = load(with_proxy("http://proxy.example.com:3128"), "inv.yml")
    assert good.hosts["gpu-01"].config.base.apt_proxy == "http://proxy.example.com:3128"
