"""gpunode's pyinfra facts: one cheap shell command each."""

from __future__ import annotations

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
