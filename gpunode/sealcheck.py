#!/usr/bin/python3
"""gpunode-seal: the node side of the drift seal (installed as /usr/local/sbin/gpunode-seal).

Python 3 standard library only: it runs on the node with the system's python3 (the GPU
probe's), as root, isolated (``python3 -I -S``: no PYTHON* variables, no site packages).

    gpunode-seal record SPEC   # seal what SPEC lists, as it is now; SPEC is then removed
    gpunode-seal check         # one JSON line: what the seal holds, and what differs now

A SPEC (written by gpunode/seal.py on the controller) is JSON::

    {"inputs": "<sha256>", "extra": {...}, "entries": [["path", "/etc/x"], ["sh", "cmd"], ...]}

For each entry the seal keeps one SHA-256 over what the entry is now:

* ``path``: missing, or its type, mode, owner and group, plus the content's SHA-256 for
  a regular file and the target for a symlink (never times: reading a file is no drift);
* ``sh``: the exit status, stdout and stderr of ``/bin/sh -c CMD`` (stdin /dev/null);
* ``unit``: a systemd unit's ``Id``, ``SubState`` and ``UnitFileState``, read for every
  ``unit`` entry at once by one ``systemctl show`` (each unit's block of its output).

The seal (/var/lib/gpunode/seal.json) is written atomically, 0600 root: it holds digests of
private files' contents, so it is as private as they are. ``check`` never prints a digest
of an entry, only which entries differ (``path /etc/x``, ``sh #3``) and a short id of each
sealed entry (so gpunode can tell whether the seal covers everything it would check).
"""

import hashlib
import json
import os
import stat
import subprocess
import sys

SEAL = "/var/lib/gpunode/seal.json"
VERSION = 1
SH_TIMEOUT_S = 120


def owner(st):
    try:
        import pwd

        user = pwd.getpwuid(st.st_uid).pw_name
    except (ImportError, KeyError):
        user = str(st.st_uid)
    try:
        import grp

        group = grp.getgrgid(st.st_gid).gr_name
    except (ImportError, KeyError):
        group = str(st.st_gid)
    return user + ":" + group


def path_state(path):
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return "error " + (exc.strerror or "")
    mode = f"{stat.S_IMODE(st.st_mode):04o}"
    if stat.S_ISLNK(st.st_mode):
        # facts read through a link: what it points to is sealed with it
        target = os.path.realpath(path)
        behind = "loop" if os.path.islink(target) else path_state(target)
        return f"link {owner(st)} {os.readlink(path)} -> {behind}"
    if stat.S_ISDIR(st.st_mode):
        return f"dir {mode} {owner(st)}"
    if stat.S_ISREG(st.st_mode):
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as stream:
                for chunk in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError as exc:
            return "file {} {} unreadable {}".format(mode, owner(st), exc.strerror or "")
        return f"file {mode} {owner(st)} {digest.hexdigest()}"
    return f"other {stat.S_IFMT(st.st_mode):o} {mode} {owner(st)}"


def sh_state(command):
    try:
        proc = subprocess.run(
            ["/bin/sh", "-c", command],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=SH_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return "timeout"
    except OSError as exc:
        return "error " + (exc.strerror or "")
    out, err = (hashlib.sha256(b).hexdigest() for b in (proc.stdout, proc.stderr))
    return f"rc={proc.returncode} {out} {err}"


UNITS_ARGV = [
    "systemctl",
    "show",
    "--all",
    "--property",
    "Id",
    "--property",
    "SubState",
    "--property",
    "UnitFileState",
    "--",
]


def unit_states(units):
    """Each unit's state, from one ``systemctl show`` of them all: its block of the output
    (systemctl prints one block per unit, in order, a blank line between). When the call
    fails or its blocks cannot be told apart, every unit gets the whole result."""
    if not units:
        return {}
    try:
        proc = subprocess.run(
            UNITS_ARGV + list(units),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=SH_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return dict.fromkeys(units, "timeout")
    except OSError as exc:
        return dict.fromkeys(units, "error " + (exc.strerror or ""))
    blocks = proc.stdout.rstrip(b"\n").split(b"\n\n")
    if proc.returncode != 0 or len(blocks) != len(units) or proc.stderr:
        out, err = (hashlib.sha256(b).hexdigest() for b in (proc.stdout, proc.stderr))
        return dict.fromkeys(units, f"rc={proc.returncode} {out} {err}")
    return {unit: "rc=0 " + block.decode(errors="replace") for unit, block in pairs(units, blocks)}


def entry_id(kind, arg):
    return hashlib.sha256((kind + "\0" + arg).encode()).hexdigest()[:16]


def entry_digest(kind, arg, now=None):
    if now is None:
        now = path_state(arg) if kind == "path" else sh_state(arg)
    return hashlib.sha256((kind + "\0" + arg + "\0" + now).encode()).hexdigest()


def digests(entries):
    """Each entry's digest, in order; the commands run side by side (a few at a time), the
    way a node with several cores answers fastest."""
    import threading  # not concurrent.futures: it imports logging, a tenth of a check's time

    out = [None] * len(entries)
    units = [i for i, (kind, _) in enumerate(entries) if kind == "unit"]
    # the units first, as one job (one systemctl for them all); then each other entry
    queue = iter(["units"] + [i for i, (kind, _) in enumerate(entries) if kind != "unit"])
    lock = threading.Lock()

    def work():
        while True:
            with lock:
                job = next(queue, None)
            if job is None:
                return
            if isinstance(job, str):  # "units"
                states = unit_states([entries[i][1] for i in units])
                for i in units:
                    out[i] = entry_digest("unit", entries[i][1], states[entries[i][1]])
            else:
                out[job] = entry_digest(*entries[job])

    workers = [
        threading.Thread(target=work) for _ in range(max(2, min(8, 2 * (os.cpu_count() or 1))))
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if any(digest is None for digest in out):
        raise RuntimeError("an entry was not checked")
    return out


def pairs(first, second):
    """zip() of two lists of one length (zip's strict= is newer than some nodes' python3)."""
    if len(first) != len(second):
        raise ValueError("lengths differ")
    return [(first[i], second[i]) for i in range(len(first))]


def valid_entries(entries):
    if not isinstance(entries, list):
        return None
    out = []
    for entry in entries:
        if (
            not isinstance(entry, list)
            or len(entry) != 2
            or entry[0] not in ("path", "sh", "unit")
            or not isinstance(entry[1], str)
            or not entry[1]
            or "\0" in entry[1]
            or (entry[0] == "unit" and not all(" " < c < "\x7f" for c in entry[1]))
        ):
            return None
        out.append((entry[0], entry[1]))
    return out


def record(spec_path):
    try:
        with open(spec_path) as stream:
            spec = json.load(stream)
    except (OSError, ValueError) as exc:
        print(f"gpunode-seal: cannot read the spec: {exc}", file=sys.stderr)
        return 2
    finally:
        try:
            os.unlink(spec_path)
        except OSError:
            pass
    entries = valid_entries(spec.get("entries")) if isinstance(spec, dict) else None
    if entries is None or not isinstance(spec.get("inputs"), str):
        print("gpunode-seal: the spec is malformed", file=sys.stderr)
        return 2
    seal = {
        "version": VERSION,
        "inputs": spec["inputs"],
        "extra": spec.get("extra") or {},
        "entries": [list(entry) + [d] for entry, d in pairs(entries, digests(entries))],
    }
    directory = os.path.dirname(SEAL)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    import tempfile  # here: `check` runs on every drift check, and never needs it

    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".seal-")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as stream:
            json.dump(seal, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.rename(tmp, SEAL)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    print(f"sealed {len(entries)} entries")
    return 0


def check():
    try:
        with open(SEAL) as stream:
            seal = json.load(stream)
    except FileNotFoundError:
        print(json.dumps({"seal": "missing"}))
        return 0
    except (OSError, ValueError) as exc:
        print(json.dumps({"seal": "unreadable", "error": str(exc)}))
        return 0
    entries = seal.get("entries") if isinstance(seal, dict) else None
    if (
        not isinstance(entries, list)
        or seal.get("version") != VERSION
        or not all(
            isinstance(e, list)
            and len(e) == 3
            and isinstance(e[2], str)
            and valid_entries([e[:2]]) is not None
            for e in entries
        )
    ):
        print(json.dumps({"seal": "unreadable", "error": "unknown format"}))
        return 0
    now = digests([(kind, arg) for kind, arg, _ in entries])
    differs = []
    for index, ((kind, arg, digest), current) in enumerate(pairs(entries, now)):
        if current != digest:
            differs.append(f"sh #{index}" if kind == "sh" else f"{kind} {arg}")
    print(
        json.dumps(
            {
                "seal": "ok",
                "inputs": seal.get("inputs"),
                "extra": seal.get("extra") or {},
                "ids": [entry_id(kind, arg) for kind, arg, _ in entries],
                "differs": differs,
            }
        )
    )
    return 0


def main(argv):
    if argv[1:2] == ["check"] and len(argv) == 2:
        return check()
    if argv[1:2] == ["record"] and len(argv) == 3:
        return record(argv[2])
    print("usage: gpunode-seal check | gpunode-seal record SPEC", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
