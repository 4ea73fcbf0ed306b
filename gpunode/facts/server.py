"""gpunode's pyinfra facts: one cheap shell command each."""

from __future__ import annotations

import shlex

from pyinfra.api import FactBase


class HostInfo(FactBase):
    """
    What gpunode needs to know about a host before it plans anything: the distro
    (os-release ID and VERSION_ID) and whether it runs in a container (where the
    clock, kernel sysctls and modules belong to the machine underneath).

    .. code:: python

        {"id": "debian", "version_id": "12", "container": "systemd-nspawn"}
        # container is "" on bare metal and VMs
    """

    def command(self) -> str:
        return (
            ". /etc/os-release 2>/dev/null; "
            'echo "id=$ID"; echo "version_id=$VERSION_ID"; '
            'echo "container=$(systemd-detect-virt --container 2>/dev/null)"'
        )

    def process(self, output: list[str]) -> dict[str, str]:
        info = {"id": "", "version_id": "", "container": ""}
        for line in output:
            key, sep, value = line.partition("=")
            if sep and key in info:
                info[key] = value.strip().strip('"')
        if info["container"] == "none":
            info["container"] = ""
        return info


APT_SOURCE_FILES = (
    "/etc/apt/sources.list",
    "/etc/apt/sources.list.d/*.list",
    "/etc/apt/sources.list.d/*.sources",
)


class AptSources(FactBase):
    """
    The package sources apt reads: each enabled ``deb`` entry of ``/etc/apt/sources.list`` and
    ``/etc/apt/sources.list.d/`` (one-line ``.list`` files and deb822 ``.sources`` files), with
    the file it is in. ``deb-src`` entries and ``Enabled: no`` stanzas are left out.

    .. code:: python

        [{"file": "/etc/apt/sources.list", "uris": ["http://deb.debian.org/debian"],
          "suites": ["bookworm"], "components": ["main"]}]
    """

    @staticmethod
    def default() -> list[dict[str, object]]:
        return []  # no output: no sources at all

    def command(self) -> str:
        return (
            f"for f in {' '.join(APT_SOURCE_FILES)}; do "
            '[ -f "$f" ] || continue; printf \'\\n==> %s\\n\' "$f"; cat "$f"; done; true'
        )

    def process(self, output: list[str]) -> list[dict[str, object]]:
        entries: list[dict[str, object]] = []
        name, lines = "", list[str]()
        for line in [*output, "==> "]:
            if line.startswith("==> "):
                if name:
                    entries += _sources(name, lines)
                name, lines = line[4:], []
            else:
                lines.append(line)
        return entries


def _sources(name: str, lines: list[str]) -> list[dict[str, object]]:
    if name.endswith(".sources"):
        return _deb822(name, lines)
    out: list[dict[str, object]] = []
    for line in lines:
        words = line.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        if words and words[0].startswith("["):  # options: [ key=value ... ]
            while words and not words[0].endswith("]"):
                words = words[1:]
            words = words[1:]
        if len(words) >= 2:
            out.append(
                {"file": name, "uris": [words[0]], "suites": [words[1]], "components": words[2:]}
            )
    return out


def _deb822(name: str, lines: list[str]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    stanza: dict[str, str] = {}
    key = ""
    for line in [*lines, ""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            fields = {k.lower(): v.split() for k, v in stanza.items()}
            enabled = " ".join(fields.get("enabled", ["yes"])).lower() != "no"
            if stanza and enabled and "deb" in fields.get("types", []):
                out.append(
                    {
                        "file": name,
                        "uris": fields.get("uris", []),
                        "suites": fields.get("suites", []),
                        "components": fields.get("components", []),
                    }
                )
            stanza, key = {}, ""
        elif line[0] in " \t" and key:
            stanza[key] += " " + line.strip()
        else:
            key, _, value = line.partition(":")
            key = key.strip()
            stanza[key] = value.strip()
    return out


# Run by the node's python3, isolated (-I -S): the interpreter that will import the module
# decides where its bytecode lives (the cache tag) and what "current" means (its magic).
_BYTECODE = (
    "import hashlib, importlib.util as u, os, sys\n"
    "src = sys.argv[1]\n"
    "pyc = u.cache_from_source(src)\n"
    "try:\n"
    "    data = open(src, 'rb').read()\n"
    "except OSError:\n"
    "    print('state=no-source pyc=' + pyc); sys.exit()\n"
    "digest = hashlib.sha256(data).hexdigest()\n"
    "try:\n"
    "    st = os.lstat(pyc)\n"
    "    head = open(pyc, 'rb').read(16) if os.path.isfile(pyc) else b''\n"
    "except OSError:\n"
    "    print('state=missing pyc=' + pyc + ' source=' + digest); sys.exit()\n"
    "ok = (head[:4] == u.MAGIC_NUMBER and head[4:8] == b'\\x03\\0\\0\\0'\n"
    "      and head[8:16] == u.source_hash(data)\n"
    "      and st.st_uid == 0 and not st.st_mode & 0o022 and not os.path.islink(pyc))\n"
    "print('state=' + ('current' if ok else 'stale') + ' pyc=' + pyc + ' source=' + digest)\n"
)


class PythonBytecode(FactBase):
    """
    Whether the node's ``python3`` has current bytecode for the module at ``path``: a
    hash-checked ``.pyc`` (Python verifies it against the source on every import, so it can
    never run stale code) in ``__pycache__`` beside it, owned by root, writable by no one
    else. ``state`` is ``current``, ``stale`` (another source, interpreter, flag, owner or
    mode), ``missing``, ``no-source`` or ``no-python``; ``source`` is the source's SHA-256.

    .. code:: python

        {"state": "current", "pyc": "/usr/local/lib/gpunode/__pycache__/pynvml.cpython-311.pyc",
         "source": "3f1c..."}
    """

    @staticmethod
    def default() -> dict[str, str]:
        return {"state": "unknown", "pyc": "", "source": ""}

    def command(self, path: str) -> str:
        return (
            "if command -v python3 >/dev/null 2>&1; then "
            f"python3 -I -S -c {shlex.quote(_BYTECODE)} {shlex.quote(path)}; "
            "else echo state=no-python; fi"
        )

    def process(self, output: list[str]) -> dict[str, str]:
        fields = dict(word.split("=", 1) for line in output for word in line.split() if "=" in word)
        return {
            "state": fields.get("state", "unknown"),
            "pyc": fields.get("pyc", ""),
            "source": fields.get("source", ""),
        }
