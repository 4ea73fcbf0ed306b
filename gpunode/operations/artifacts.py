"""A content-addressed artifact store on the node, and the links that pick a version.

An artifact (a model, or a runtime's tarball) is declared by URI and sha256. It is
fetched into ``<store>/sha256/<digest>/<entry>``: downloaded into a temporary directory
next to it, verified, unpacked if it is a tarball, and only then renamed into place in one
step, so the store never holds an unverified or half-written version, and a failed
download or a checksum mismatch leaves everything that was there as it was.

A service uses a version through its ``current`` link (``previous`` remembers the one
before). A switch replaces the link atomically (a new link renamed over the old one);
:func:`prune` keeps the newest N versions plus every version a link points at.

.. code:: python

    from gpunode.operations.artifacts import fetch, switch
    fetch(name="Fetch the model", store="/var/lib/gpunode/models", uri=uri,
          sha256=digest, unpack=False, present=host.get_fact(StoreDigests, store=store))
"""

from __future__ import annotations

import shlex

from pyinfra.api import operation

from gpunode.facts.artifacts import DIGEST


def fetch_script(store: str, uri: str, sha256: str, entry: str, unpack: bool) -> str:
    """The shell script that fetches one artifact (see the module docstring)."""
    assert DIGEST.match(sha256), sha256
    q = shlex.quote
    base = f"{store}/sha256"
    final = f"{base}/{sha256}"
    place = (
        f'mkdir "$t/{entry}" && tar -xf "$t/blob" -C "$t/{entry}" --no-same-owner '
        f'--no-same-permissions && rm "$t/blob"'
        if unpack
        else f'mv "$t/blob" "$t/{entry}" && chmod 0644 "$t/{entry}"'
    )
    return " && ".join(
        [
            "set -e",
            # the store is read by services under their own users: its directories must not
            # take the umask of gpunode's session (027 where pam_umask applies login.defs')
            "umask 022",
            f"mkdir -p {q(base)}",
            f"t=$(mktemp -d {q(base + '/.fetch.XXXXXX')})",
            "trap 'rm -rf \"$t\"' EXIT",
            f"u={q(uri)}",
            'curl -fsSL --retry 3 --connect-timeout 20 -o "$t/blob" "$u"',
            'got=$(sha256sum "$t/blob" | cut -d" " -f1)',
            f'if [ "$got" != {sha256} ]; then echo "gpunode: checksum mismatch for $u: expected '
            f'{sha256}, got $got; the store and the links are unchanged" >&2; exit 1; fi',
            place,
            'chmod -R u+rwX,go+rX,go-w "$t"',
            f'mv -T "$t" {q(final)}',
        ]
    )


@operation()
def fetch(
    store: str,
    uri: str,
    sha256: str,
    present: list[str],
    entry: str = "model",
    unpack: bool = False,
):
    """
    Fetch an artifact into a content-addressed store, verified before it is used.

    + store: the store's directory (the artifact lands in ``<store>/sha256/<sha256>/<entry>``)
    + uri: ``http(s)://`` or ``file://`` (a local mirror or NFS mount)
    + sha256: the expected digest of the file at ``uri``
    + present: the digests already in the store (the ``StoreDigests`` fact)
    + entry: the name of the file (or unpacked directory) inside the digest's directory
    + unpack: a tarball, unpacked into ``<entry>/``

    .. code:: python

        fetch(
            name="Fetch the model",
            store="/var/lib/gpunode/models",
            uri="http://mirror.internal/models/smollm2.gguf",
            sha256="9a0e...",
            present=host.get_fact(StoreDigests, store="/var/lib/gpunode/models"),
        )
    """
    if sha256 in present:
        return
    yield fetch_script(store, uri, sha256, entry, unpack)


@operation()
def switch(directory: str, target: str, links: dict[str, str]):
    """
    Point ``<directory>/current`` at ``target`` in one atomic step (a new link renamed over
    the old one); the old target becomes ``previous``. No change when it already points there.

    + directory: the service's directory (created by the caller)
    + target: the store directory to use
    + links: the directory's current links (the ``Links`` fact)

    .. code:: python

        switch(name="Use the model", directory="/var/lib/gpunode/inference/chat",
               target="/var/lib/gpunode/models/sha256/9a0e...", links=host.get_fact(Links, ...))
    """
    if links.get("current") == target:
        return
    yield switch_script(directory, target, links.get("current") or None)


def switch_script(directory: str, target: str, old: str | None) -> str:
    q = shlex.quote
    steps = []
    if old:
        steps += [
            f"ln -sfn {q(old)} {q(directory + '/.previous.new')}",
            f"mv -T {q(directory + '/.previous.new')} {q(directory + '/previous')}",
        ]
    steps += [
        f"ln -sfn {q(target)} {q(directory + '/.current.new')}",
        f"mv -T {q(directory + '/.current.new')} {q(directory + '/current')}",
        f"touch {q(target)}",  # recency for prune: the version used last is the newest
    ]
    return " && ".join(steps)


def revert_script(directory: str) -> str:
    """Swap ``current`` and ``previous`` atomically (each link renamed into place); fails when
    there is no previous version."""
    d = shlex.quote(directory)
    return (
        f"set -e; cd {d}; old=$(readlink previous || true); new=$(readlink current); "
        '[ -n "$old" ] || { echo "gpunode: no previous version to return to" >&2; exit 1; }; '
        'ln -sfn "$new" .previous.new; ln -sfn "$old" .current.new; '
        "mv -T .current.new current; mv -T .previous.new previous; "
        'echo "reverted: $new -> $old"'
    )


def prune_script(store: str, link_globs: list[str], keep: int) -> str:
    """Remove store versions beyond the newest ``keep``, except any a link points at."""
    q = shlex.quote
    globs = " ".join(glob for glob in link_globs)  # trusted: built from gpunode's own paths
    return (
        f"cd {q(store + '/sha256')} && "
        f'linked=$(for l in {globs}; do [ -L "$l" ] && basename "$(readlink "$l")"; done; true) && '
        f"ls -1t | grep -E '^[0-9a-f]{{64}}$' | tail -n +{keep + 1} | while read -r d; do "
        'case " $(echo $linked) " in *" $d "*) ;; *) rm -rf -- "$d" ;; esac; done'
    )


@operation(is_idempotent=False)
def prune(store: str, link_globs: list[str], keep: int):
    """
    Keep the newest ``keep`` versions of a store, plus every version a link points at.
    Run it ``_if`` a switch changed something.

    .. code:: python

        prune(name="Old model versions", store="/var/lib/gpunode/models",
              link_globs=["/var/lib/gpunode/inference/*/current"], keep=3, _if=sw.did_change)
    """
    yield prune_script(store, link_globs, keep)
