"""The code's layout holds: no import cycle, dependencies point one way, every constrained
type is defined once, and gpunode.schema stands alone (docs/layout.md).

These read the source with ``ast`` (every import counts: module level, inside functions and
under ``if TYPE_CHECKING:``), so a cycle cannot hide behind a late import.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from gpunode.paths import REPO_ROOT

PACKAGE = REPO_ROOT / "gpunode"

# Layers, most dependent first: a module may import only from its own layer or later ones.
# "logic" is every gpunode module not in another layer (gpunode/<concern>.py).
LAYERS = ("commands", "roles", "operations", "facts", "clients", "logic", "schema")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    found = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    found.update({module_name(p): p for p in (REPO_ROOT / "roles").glob("*.py")})
    return found


def imports(tree: ast.Module, known: dict[str, Path]) -> Iterator[tuple[str, ast.AST]]:
    """(imported gpunode/roles module, node) for every import in the module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ("gpunode", "roles"):
                    yield alias.name, node
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module.split(".")[0] not in ("gpunode", "roles"):
                continue
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                yield (child if child in known else node.module), node


def graph() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for target, _ in imports(ast.parse(path.read_text(), str(path)), known):
            parts = target.split(".")
            # importing a.b.c runs a/__init__ and a/b/__init__ first
            for n in range(1, len(parts) + 1):
                prefix = ".".join(parts[:n])
                if prefix in known and prefix != name:
                    edges[name].add(prefix)
    return edges


def layer(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "roles":
        return "roles"
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return "logic"


def test_no_import_cycle() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_dependencies_point_one_way() -> None:
    """commands -> roles -> operations -> facts -> clients -> logic -> schema."""
    wrong = []
    for name, targets in graph().items():
        here = LAYERS.index(layer(name))
        for target in targets:
            if target in ("gpunode", "roles"):
                continue
            if LAYERS.index(layer(target)) < here:
                wrong.append(f"{name} ({layer(name)}) imports {target} ({layer(target)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_late_or_type_checking_import_of_gpunode_modules() -> None:
    """Imports of gpunode's own modules sit at the top of the file; the one exception is the
    command line, which imports a subcommand only when it runs (startup time)."""
    known = modules()
    late = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        top = {id(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))}
        for target, node in imports(tree, known):
            if id(node) in top or name == "gpunode.commands.cli":
                continue
            late.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}: {target}")
    assert not late, "imports not at module level:\n" + "\n".join(sorted(set(late)))


def _definitions() -> Iterator[tuple[str, str, str, ast.AST]]:
    """(module, name, kind, value) of module-level constrained types and patterns."""
    for name, path in modules().items():
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target, value = node.targets[0], node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                target, value = node.target, node.value
            else:
                continue
            if not isinstance(target, ast.Name):
                continue
            if isinstance(value, ast.Subscript) and ast.unparse(value.value) == "Annotated":
                yield name, target.id, "type", value
            elif target.id.endswith("_RE"):
                yield name, target.id, "pattern", value


def test_each_constrained_type_and_pattern_is_defined_once() -> None:
    seen: dict[str, str] = {}
    twice = []
    for module, name, kind, _ in _definitions():
        if name in seen:
            twice.append(f"{kind} {name}: in {seen[name]} and {module}")
        seen.setdefault(name, module)
    assert not twice, "\n".join(twice)


def test_constrained_types_live_in_schema_types() -> None:
    elsewhere = [
        f"{module}.{name}"
        for module, name, kind, _ in _definitions()
        if kind == "type" and module != "gpunode.schema.types"
    ]
    assert not elsewhere, f"constrained types outside gpunode/schema/types.py: {elsewhere}"


def test_no_pattern_is_written_twice() -> None:
    """The same regular expression under two names is one type defined twice."""
    by_text: dict[str, str] = {}
    twice = []
    for module, name, _, value in _definitions():
        for node in ast.walk(value):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value
                if not re.match(r"^\^.*\$$", text):
                    continue
                where = f"{module}.{name}"
                if text in by_text and by_text[text] != where:
                    twice.append(f"{text!r}: {by_text[text]} and {where}")
                by_text.setdefault(text, where)
    assert not twice, "\n".join(twice)


def test_schema_imports_nothing_else_from_gpunode() -> None:
    schema = sorted(n for n in modules() if n.startswith("gpunode.schema"))
    code = (
        "import importlib, json, sys\n"
        f"for name in {schema!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('gpunode', 'roles'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    loaded = json.loads(out.stdout)
    assert set(schema) <= set(loaded)
    others = [m for m in loaded if m != "gpunode" and not m.startswith("gpunode.schema")]
    assert not others, f"importing gpunode.schema loaded {others}"


def test_the_checks_above_would_see_a_cycle_and_a_duplicate(tmp_path: Path) -> None:
    """The graph and the definition scan work on real files (not a vacuous pass)."""
    edges = graph()
    assert "gpunode.schema.types" in edges["gpunode.schema.node"]
    assert "gpunode.schema.node" in edges["gpunode.config"]
    names = [name for _, name, _, _ in _definitions()]
    assert "AbsPath" in names and "ABS_PATH_RE" in names


def test_facts_and_operations_mirror_each_other() -> None:
    """As pyinfra/facts/ and pyinfra/operations/: a concern's facts sit beside its operations
    (operations may stand alone where pyinfra's own facts serve them, e.g. systemd)."""
    facts = {p.stem for p in (PACKAGE / "facts").glob("*.py")} - {"__init__"}
    operations = {p.stem for p in (PACKAGE / "operations").glob("*.py")} - {"__init__"}
    assert facts, "no facts found"
    assert facts <= operations, f"facts without operations: {sorted(facts - operations)}"


def _unowned_writes(source: str) -> list[str]:
    """files.put / files.template / files.directory calls that do not name both the owner
    and the group: connected as an admin user with sudo, pyinfra would leave such a file
    owned by that user (issue 17: every file gpunode writes is root's unless said otherwise)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "files"
            and node.func.attr in ("put", "template", "directory")
            and not {"user", "group"} <= {k.arg for k in node.keywords}
        ):
            found.append(f"line {node.lineno}: files.{node.func.attr}")
    return found


def test_every_file_a_role_writes_names_its_owner_and_group() -> None:
    unowned = {
        str(path.relative_to(REPO_ROOT)): found
        for path in sorted((REPO_ROOT / "roles").glob("*.py"))
        if (found := _unowned_writes(path.read_text()))
    }
    assert unowned == {}


def test_the_owner_check_sees_a_write_without_one() -> None:
    assert _unowned_writes('files.put(name="x", src="a", dest="/b", user="root")') == [
        "line 1: files.put"
    ]
    assert _unowned_writes('files.directory(path="/b", user="root", group="root")') == []
