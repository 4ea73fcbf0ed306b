"""Mutation testing of the modules where a silent bug costs most (`make mutate`, issue 18).

A mutant is a small plausible bug (a `<` for a `<=`, a string changed, an argument dropped)
planted in one function; a mutant the unit tests do not notice ("survived") is a bug that
would reach users.  For each module in MODULES this runs mutmut over that module only, with
only the unit test files listed for it, and prints killed / survived / timeout / total and the
score (killed and timed out over checked); the survivors, each with its mutant id and the
changed line, go to .mutate/survivors-NAME.txt for review (docs/mutation.md says how to read
them and lists the current ones with a judgement each).

Why it works the way it does (docs/mutation.md has the long form):
- mutmut reads its settings from the current directory and mutates in place under
  ./mutants/, so each module gets its own scratch copy of the tree under .mutate/work/NAME/,
  with a setup.cfg naming that module (only_mutate) and its tests
  (pytest_add_cli_args_test_selection); the repository itself is never touched.
- mutmut never mutates a decorated function (a pyinfra @operation or @deploy, a
  @contextmanager), yet those hold the code that matters most here (private_file,
  secret_file, the firewall role).  In the scratch copy only, each decorated top-level
  function of the module under test is rewritten to its equivalent undecorated form
  (`def f` ... and `f = deco(f)` at the end of the module), on the same lines, so mutmut
  mutates its body and the line numbers still match the repository's file.
- The score is a figure, not a gate: the exit status is 0 unless mutmut itself fails (for
  example when the listed tests do not pass on the unmutated code), or --min-score is given
  and a module scores below it.

    .venv/bin/python scripts/mutate.py                      # every module
    .venv/bin/python scripts/mutate.py --module hardening   # one module
    .venv/bin/python scripts/mutate.py --max-mutants 30     # a random sample of 30 per module
    .venv/bin/python scripts/mutate.py --rev HEAD           # the committed tree, not the work tree
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.metadata
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / ".mutate"

# Used when pyproject.toml has no `mutate` extra; the range the code below was written for
# (it reads mutmut's setup.cfg keys, its `results` and `show` output, and its .meta files).
MUTMUT = "mutmut>=3.8.1,<3.9"


@dataclasses.dataclass(frozen=True)
class Module:
    """One file to mutate and the unit test files that cover it."""

    source: str
    tests: tuple[str, ...]
    why: str


def _tests(*names: str) -> tuple[str, ...]:
    return tuple(f"tests/unit/test_{name}.py" for name in names)


# The modules where a silent bug costs most (issue 18), each with the unit tests that exercise
# it (found by what the tests import and call; mutmut then runs, for each mutant, only those
# of these tests that called the mutated function on the clean run).
MODULES: dict[str, Module] = {
    "secrets": Module(
        "gpunode/secrets.py",
        _tests("secretfile", "vault", "vault_rotation", "hostile", "inference"),
        "the checks of secrets: against the rest of a node's config (vault.addr, client key, "
        "rotate_secret_id, one file per secret)",
    ),
    "files": Module(
        "gpunode/operations/files.py",
        _tests("secretfile", "drift", "pipeline", "bites_runs", "files_bites"),
        "private_file / secret_file / file_mode: what a secret file on disk looks like",
    ),
    "vault": Module(
        "gpunode/clients/vault.py",
        _tests(
            "vault",
            "vault_rotation",
            "vault_bites",
            "secretfile",
            "rotate_gateway",
            "bites_config",
            "redirects",
        ),
        "Vault session, reads and writes, secret-id rotation, root-only files",
    ),
    "firewall": Module(
        "gpunode/firewall.py",
        _tests(
            "hardening",
            "hardening_remote_logs",
            "gateway",
            "inference",
            "inventories",
            "bites_config",
            "firewall_bites",
        ),
        "nftables ruleset rendering, allowed ports and sources, egress",
    ),
    "firewall-role": Module(
        "roles/firewall.py",
        _tests("hardening"),
        "the firewall role: apply with an armed rollback, confirm, disabled case",
    ),
    "hardening": Module(
        "gpunode/hardening.py",
        _tests("hardening", "hostile", "hardening_bites", "hardening_remote_logs", "audit"),
        "sshd options, AllowGroups, sudo defaults, sysctl, audit rules, AIDE, remote logs",
    ),
    "drift": Module(
        "gpunode/commands/drift.py",
        _tests("drift", "nomad_drift", "seal", "bites_runs", "drift_bites"),
        "gpunode drift: what counts as drift, exit codes, reports",
    ),
    "artifacts": Module(
        "gpunode/operations/artifacts.py",
        _tests("artifacts", "artifacts_ops"),
        "fetch (checksum before use), switch and prune of model/runtime artifacts",
    ),
    "rotate": Module(
        "gpunode/commands/rotate.py",
        _tests("vault", "rotate_gateway", "rotate_secrets"),
        "secret and client-key rotation, roll-out and health checks",
    ),
    "rollout": Module(
        "gpunode/commands/rollout.py",
        _tests("rollout", "gateway", "inference"),
        "canary / batch roll-out, health waits, revert",
    ),
}

KILLED = {"killed", "timeout", "caught by type check"}

# A pytest plugin for mutmut's runs only (written into the scratch copy, loaded with -p).
# - mutmut wraps every function it mutates in a trampoline taking (*args, **kwargs); pyinfra's
#   FunctionCommand decides whether to pass (state, host) to a callback from
#   inspect.getfullargspec, which does not look through the wrapper, so the trampolined
#   callback (files._write) would be called without them and every test writing a file
#   would fail.  Reading the argument names of the wrapped function restores what pyinfra
#   sees.
# - mutmut gives pytest the tests it selects (for the clean run of a sample, and for each
#   mutant) as node ids taken from a set, so in an order that changes from run to run
#   (string hashing is randomised per process), and pytest runs node ids in the order given.
#   A test that depends on an earlier one (state kept for the life of the process) then
#   fails the clean run at random ("Failed to run clean test"), or kills a mutant for the
#   wrong reason.  The plugin puts the selected tests back in the order `pytest tests/unit`
#   runs them: file by file, then as defined in the file.
PLUGIN = '''"""scripts/mutate.py: pyinfra reads a callback's arguments through the trampoline,
and the tests mutmut selects run in the order `pytest tests/unit` runs them."""

import inspect

from pyinfra.api import command

_getfullargspec = command.getfullargspec
command.getfullargspec = lambda function: _getfullargspec(inspect.unwrap(function))


def _definition_order(item):
    path, line, _ = item.location
    spec = getattr(item, "callspec", None)
    return (path, -1 if line is None else line, tuple(spec.indices.values()) if spec else ())


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=_definition_order)
'''


def ensure_mutmut() -> None:
    """Install mutmut into this interpreter's environment unless a version in range is there."""
    want = MUTMUT
    try:
        extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
            "optional-dependencies"
        ]
        want = next(r for r in extras.get("mutate", []) if r.lower().startswith("mutmut"))
    except (KeyError, StopIteration, OSError, tomllib.TOMLDecodeError):
        pass
    low, high = _range(want)
    try:
        have = importlib.metadata.version("mutmut")
    except importlib.metadata.PackageNotFoundError:
        have = None
    if have is not None and low <= _version(have) < high:
        return
    print(f"installing {want} into {sys.prefix}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", want], check=True)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _range(requirement: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    low = re.search(r">=\s*([\d.]+)", requirement)
    high = re.search(r"<\s*([\d.]+)", requirement)
    return (
        _version(low.group(1)) if low else (0,),
        _version(high.group(1)) if high else (10**6,),
    )


def undecorate(source: str) -> str:
    """The same module with each decorated top-level function rebound after its definition.

    `@deco\\ndef f(...)` becomes `def f(...)` and `f = deco(f)`: the same object under the same
    name, but a function mutmut will mutate.  The decorator lines become blank lines and the
    rebinding goes at the end of the module, so every other line keeps its number; where
    module-level code uses the name after its definition, the rebinding goes right after the
    function instead (line numbers then shift, which only affects the survivors' report).
    """
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    at_end: list[str] = []
    after: dict[int, str] = {}
    blank: set[int] = set()
    for index, node in enumerate(tree.body):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or not node.decorator_list:
            continue
        wrapped = node.name
        for decorator in reversed(node.decorator_list):
            wrapped = f"({ast.get_source_segment(source, decorator)})({wrapped})"
        binding = f"{node.name} = {wrapped}\n"
        first = min(d.lineno for d in node.decorator_list) - 1  # the first `@` line, 0-based
        blank.update(range(first, node.lineno - 1))
        used_later = any(
            isinstance(name, ast.Name) and name.id == node.name
            for later in tree.body[index + 1 :]
            if not isinstance(later, ast.FunctionDef | ast.AsyncFunctionDef)
            for name in ast.walk(later)
        )
        if used_later:
            after[node.end_lineno or node.lineno] = binding
        else:
            at_end.append(binding)
    out = []
    for number, line in enumerate(lines, start=1):
        out.append("\n" if number - 1 in blank else line)
        if number in after:
            out.append(after[number])
    if out and not out[-1].endswith("\n"):
        out.append("\n")
    return "".join(out) + "".join(at_end)


def make_workdir(name: str, module: Module, rev: str | None) -> Path:
    """A scratch copy of the tree for one module, with mutmut's settings for that module."""
    work = OUT / "work" / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if rev:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", rev], cwd=ROOT, check=True, capture_output=True
        ).stdout
        archive_path = work.parent / f"{name}.tar"
        archive_path.write_bytes(archive)
        with tarfile.open(archive_path) as tar:
            tar.extractall(work, filter="data")
        archive_path.unlink()
    else:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        ).stdout.split(b"\0")
        for raw in listed:
            if not raw:
                continue
            path = raw.decode()
            source = ROOT / path
            if not source.is_file():  # deleted in the work tree
                continue
            target = work / path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    for path in (module.source, *module.tests):
        if not (work / path).is_file():
            raise SystemExit(f"mutate: {path} (module {name}) is not in the tree")
    target = work / module.source
    target.write_text(undecorate(target.read_text()))
    (work / "mutate_plugin.py").write_text(PLUGIN)
    also_copy = sorted(
        entry.name
        for entry in work.iterdir()
        if entry.name not in {"gpunode", "roles", "tests", "setup.cfg", "pyproject.toml"}
        and not entry.name.startswith(".")
    )
    setup_cfg = [
        "[mutmut]",
        "source_paths =\n    gpunode\n    roles",
        f"only_mutate = {module.source}",
        "pytest_add_cli_args_test_selection =\n" + "\n".join(f"    {t}" for t in module.tests),
        # -p no:cacheprovider: no .pytest_cache written into the scratch copy's tests
        "pytest_add_cli_args =\n    -p\n    no:cacheprovider\n    -p\n    mutate_plugin",
        "also_copy =\n" + "\n".join(f"    {entry}" for entry in also_copy),
        "use_git_change_detection = false",
        # Every pytest run (stats, clean run, each mutant) in a fresh fork of a process that
        # has only collected the tests: the code keeps per-process state (the warnings
        # printed once per run in gpunode/inventory.py, caches), which a run in the same
        # process as an earlier one would inherit, failing clean tests or killing mutants
        # for the wrong reason.
        "process_isolation = forkserver",
        "",
    ]
    (work / "setup.cfg").write_text("\n".join(setup_cfg))
    return work


def mutant_names(work: Path, module: Module) -> list[str]:
    """Every mutant mutmut will generate for the module (to sample from)."""
    code = (
        "import sys\n"
        "from mutmut.mutation.file_mutation import mutate_file_contents\n"
        "path = sys.argv[1]\n"
        "prefix = path[:-3].replace('/', '.')\n"
        "for name in mutate_file_contents(path, open(path).read()).mutant_names:\n"
        "    print(f'{prefix}.{name}')\n"
    )
    listed = subprocess.run(
        [sys.executable, "-c", code, module.source],
        cwd=work,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return listed.split()


def run_module(name: str, module: Module, args: argparse.Namespace) -> dict[str, object]:
    started = time.monotonic()
    work = make_workdir(name, module, args.rev)
    command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.jobs)]
    total_generated = None
    if args.max_mutants:
        names = mutant_names(work, module)
        total_generated = len(names)
        if len(names) > args.max_mutants:
            command += sorted(random.Random(args.seed).sample(names, args.max_mutants))
    log = OUT / f"mutmut-{name}.log"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)
    print(f"{name}: mutating {module.source} against {', '.join(module.tests)}", flush=True)
    with log.open("w") as out:
        proc = subprocess.run(command, cwd=work, stdout=out, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        text = log.read_text(errors="replace").replace("\r", "\n")
        kept = [
            line
            for line in text.splitlines()
            if line.strip() and not "\u2800" <= line.strip()[0] <= "\u28ff"
        ]
        tail = "\n".join(kept[-40:])
        raise RuntimeError(f"mutmut failed for {name} (exit {proc.returncode}); {log}:\n{tail}")
    statuses = read_statuses(work, env)
    counts: dict[str, int] = {}
    for status in statuses.values():
        counts[status] = counts.get(status, 0) + 1
    survivors = sorted(
        (key for key, status in statuses.items() if status not in KILLED | {"not checked"}),
        key=_natural,
    )
    write_survivors(name, module, work, env, statuses, survivors)
    killed = sum(counts.get(s, 0) for s in ("killed", "caught by type check"))
    timeout = counts.get("timeout", 0)
    checked = sum(n for s, n in counts.items() if s != "not checked")
    result = {
        "module": name,
        "source": module.source,
        "killed": killed,
        "timeout": timeout,
        "survived": counts.get("survived", 0),
        "no_tests": counts.get("no tests", 0),
        "other": sum(
            n
            for s, n in counts.items()
            if s not in {"killed", "caught by type check", "timeout", "survived", "no tests"}
            and s != "not checked"
        ),
        "total": checked,
        "generated": total_generated if total_generated is not None else checked,
        "score": round(100 * (killed + timeout) / checked, 1) if checked else None,
        "seconds": round(time.monotonic() - started),
    }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _natural(key: str) -> tuple[str, int]:
    stem, _, number = key.rpartition("__mutmut_")
    return stem, int(number) if number.isdigit() else 0


def read_statuses(work: Path, env: dict[str, str]) -> dict[str, str]:
    """mutant id -> mutmut's status word, from `mutmut results --all true`."""
    listed = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"],
        cwd=work,
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    statuses = {}
    for line in listed.splitlines():
        key, sep, status = line.strip().rpartition(": ")
        if sep and "__mutmut_" in key:
            statuses[key] = status
    return statuses


def write_survivors(
    name: str,
    module: Module,
    work: Path,
    env: dict[str, str],
    statuses: dict[str, str],
    survivors: list[str],
) -> None:
    """.mutate/survivors-NAME.txt: each survivor, its status, the changed lines, the diff."""
    original = (work / module.source).read_text().splitlines()
    blocks = []
    for key in survivors:
        diff = subprocess.run(
            [sys.executable, "-m", "mutmut", "show", key],
            cwd=work,
            capture_output=True,
            text=True,
            env=env,
        ).stdout
        removed = [
            line[1:] for line in diff.splitlines() if line.startswith("-") and line[1:2] != "-"
        ]
        added = [
            line[1:] for line in diff.splitlines() if line.startswith("+") and line[1:2] != "+"
        ]
        where = [str(original.index(line) + 1) for line in removed if line in original]
        head = f"{key}  [{statuses[key]}]  {module.source}:{','.join(where) or '?'}"
        change = [f"  - {line.strip()}" for line in removed] + [f"  + {x.strip()}" for x in added]
        blocks.append("\n".join([head, *change, "", *("    " + x for x in diff.splitlines())]))
    path = OUT / f"survivors-{name}.txt"
    header = (
        f"# {module.source}: {len(survivors)} mutants not killed by {', '.join(module.tests)}\n"
        f"# ({time.strftime('%Y-%m-%d %H:%M')}; `mutmut show ID` in .mutate/work/{name} with"
        " --keep)\n\n"
    )
    path.write_text(header + "\n\n".join(blocks) + ("\n" if blocks else ""))


def print_table(results: list[dict[str, object]]) -> None:
    row = "{:<14} {:>7} {:>8} {:>7} {:>8} {:>6} {:>9} {:>7} {:>6}"
    print()
    print(
        row.format(
            "module",
            "killed",
            "survived",
            "timeout",
            "no tests",
            "total",
            "generated",
            "score",
            "time",
        )
    )
    for r in results:
        score = "-" if r["score"] is None else f"{r['score']}%"
        print(
            row.format(
                str(r["module"]),
                r["killed"],
                r["survived"],
                r["timeout"],
                r["no_tests"],
                r["total"],
                r["generated"],
                score,
                f"{r['seconds']}s",
            )
        )
    killed = sum(int(str(r["killed"])) + int(str(r["timeout"])) for r in results)
    total = sum(int(str(r["total"])) for r in results)
    if total:
        print(f"\noverall: {killed}/{total} killed = {100 * killed / total:.1f}%")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--module",
        action="append",
        choices=sorted(MODULES),
        help="run this module only (repeatable); default: all",
    )
    parser.add_argument(
        "--max-mutants", type=int, default=0, help="a random sample of N per module"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    parser.add_argument(
        "--min-score",
        type=float,
        default=None,
        help="exit 1 when a module scores below N percent (default: no gate)",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="mutants at once")
    parser.add_argument("--rev", help="mutate this git revision's tree instead of the work tree")
    parser.add_argument("--keep", action="store_true", help="keep .mutate/work/NAME afterwards")
    parser.add_argument("--list", action="store_true", help="print the modules and their tests")
    args = parser.parse_args(argv)
    if args.list:
        for name, module in MODULES.items():
            print(f"{name:<14} {module.source}: {module.why}\n{'':<15}{' '.join(module.tests)}")
        return 0
    if args.max_mutants < 0 or args.jobs < 1:
        parser.error("--max-mutants must be >= 0 and --jobs >= 1")
    ensure_mutmut()
    OUT.mkdir(exist_ok=True)
    results = []
    failed = []
    for name in args.module or list(MODULES):
        try:
            result = run_module(name, MODULES[name], args)
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            failed.append(name)
            continue
        results.append(result)
        print(
            f"{name}: {result['killed']} killed, {result['survived']} survived, "
            f"{result['timeout']} timeout, {result['total']} checked, score {result['score']}%"
            f" ({result['seconds']}s; survivors in .mutate/survivors-{name}.txt)",
            flush=True,
        )
    print_table(results)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    with (OUT / "results.jsonl").open("a") as out:
        for r in results:
            out.write(json.dumps({"at": stamp, **r}) + "\n")
    if failed:
        print(f"mutmut failed for: {', '.join(failed)}", file=sys.stderr)
        return 2
    if args.min_score is not None:
        low = [
            r for r in results if r["score"] is not None and float(str(r["score"])) < args.min_score
        ]
        if low:
            print(
                "below --min-score "
                + f"{args.min_score}%: "
                + ", ".join(f"{r['module']} {r['score']}%" for r in low),
                file=sys.stderr,
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
