"""Facts over ini files that gpunode edits key by key (dnf.conf), read by a parser on the node.

The parser (:data:`INI_SCRIPT`, run by the node's ``python3``: dnf itself is Python on EL9,
so it is there wherever dnf is) follows libdnf's ini rules: ``[section]`` headers, ``key=value``
with the key and value stripped, ``#`` and ``;`` comment lines, and a line that starts with a
space or tab continues the previous value. gpunode/operations/ini.py edits with the same script.
"""

from __future__ import annotations

import json
import shlex

from pyinfra.api import FactBase

# argv: get PATH SECTION KEY  -> prints {"exists": bool, "values": [...]} (every occurrence
#       set PATH SECTION KEY VALUE / unset PATH SECTION KEY -> rewrites PATH atomically
INI_SCRIPT = r"""
import json, os, sys, tempfile
mode, path, section, key = sys.argv[1:5]
try:
    with open(path) as f:
        lines = f.read().splitlines(True)
    exists = True
except FileNotFoundError:
    lines, exists = [], False
cur, start, end, hits, prev = None, None, None, [], None
for i, line in enumerate(lines):
    s = line.strip()
    if line[:1] in (" ", "\t") and s and prev is not None:  # continues the previous value
        if prev:
            prev[1], prev[2] = i + 1, prev[2] + "\n" + s
        if cur == section:
            end = i + 1
        continue
    prev = None
    if not s or s[0] in "#;":
        continue
    if s.startswith("["):
        cur = s[1:s.index("]")].strip() if "]" in s else None
        if cur == section and start is None:
            start = i
        continue
    k, eq, v = s.partition("=")
    prev = []  # another key: its continuation lines are skipped
    if cur == section:
        end = i + 1
        if eq and k.strip() == key:
            prev = [i, i + 1, v.strip()]
            hits.append(prev)
if mode == "get":
    print(json.dumps({"exists": exists, "values": [h[2] for h in hits]}))
    sys.exit(0)
new = "%s=%s\n" % (key, sys.argv[5]) if mode == "set" else ""
out = list(lines)
for h in reversed(hits):
    del out[h[0]:h[1]]
if new and hits:
    out.insert(hits[0][0], new)
elif new and start is not None:
    at = max(end or 0, start + 1)
    if at and out[at - 1:at] and not out[at - 1].endswith("\n"):
        out[at - 1] += "\n"
    out.insert(at, new)
elif new:
    if out and not out[-1].endswith("\n"):
        out[-1] += "\n"
    out += ["[%s]\n" % section, new]
if out == lines:
    sys.exit(0)
st = os.stat(path) if exists else None
fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".gpunode-")
with os.fdopen(fd, "w") as f:
    if st:
        os.fchmod(f.fileno(), st.st_mode & 0o7777)
        os.fchown(f.fileno(), st.st_uid, st.st_gid)
    else:
        os.fchmod(f.fileno(), 0o644)
    f.write("".join(out))
os.replace(tmp, path)
"""


def ini_command(*args: str) -> str:
    return " ".join(shlex.quote(a) for a in ("python3", "-c", INI_SCRIPT.strip(), *args))


class IniValues(FactBase):
    """
    Every value a key has in one section of an ini file (one per occurrence: a file edited
    by hand or by an appended line may hold a key twice), and whether the file exists.

    .. code:: python

        host.get_fact(IniValues, path="/etc/dnf/dnf.conf", section="main", key="proxy")
        {"exists": True, "values": ["http://proxy.example.com:3128"]}
    """

    def command(self, path: str, section: str, key: str) -> str:
        return ini_command("get", path, section, key)

    def process(self, output: list[str]) -> dict[str, object]:
        return dict(json.loads("".join(output)))
