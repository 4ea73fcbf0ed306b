"""One redirect rule for every client that sends a credential (Vault, Nomad).

A redirect is followed only within the origin the client was given (scheme, host and
port, as RFC 6454 defines an origin; a default port counts as written out). A redirect to
any other origin raises :class:`CrossOriginRedirect` before anything is sent there: the
credential (the ``X-Vault-Token`` or ``X-Nomad-Token`` header, an AppRole login's body)
never reaches that host, and nothing it could answer reaches gpunode. A Vault standby
that redirects to the active node is such a case: point ``vault.addr`` at the node (or
load balancer) that answers.

.. code:: python

    session = requests.Session()
    session.hooks["response"].append(same_origin_hook("https://vault.example.com:8200"))
    opener = urllib.request.build_opener(SameOriginRedirects("https://nomad.example.com:4646"))
"""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from http.client import HTTPMessage
from typing import IO, Any
from urllib.parse import urljoin, urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_REDIRECTS = 5  # same-origin hops in one request (requests' own default is 30)


class CrossOriginRedirect(Exception):  # noqa: N818 - the name says what happened
    """A server redirected a credential-bearing request to another origin; refused."""

    def __init__(self, start: str, target: str) -> None:
        self.start, self.target = origin(start), origin(target)
        super().__init__(
            f"{self.start} redirected to {self.target}, another origin: refused, "
            "nothing was sent there"
        )


def origin(url: str) -> str:
    """``scheme://host:port`` of a URL, lowercased, the default port written out. A port
    that does not parse makes an origin of its own; an unprintable one is shown escaped."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port: int | str | None = parts.port or DEFAULT_PORTS.get(scheme)
    except ValueError:
        port = "(bad port)"
    text = f"{scheme}://{host}:{port}"
    return text if text.isprintable() else ascii(text)


def check(start: str, target: str) -> None:
    """Raise CrossOriginRedirect unless ``target`` has the origin of ``start``."""
    if origin(target) != origin(start):
        raise CrossOriginRedirect(start, target)


def same_origin_hook(start: str) -> Callable[..., Any]:
    """A requests response hook (``Session.hooks["response"]``): requests calls it on each
    answer before it follows a redirect, so a Location elsewhere stops the request."""

    def hook(response: Any, *args: Any, **kwargs: Any) -> Any:
        check(start, response.url)
        if response.is_redirect:
            check(start, urljoin(response.url, response.headers["location"]))
        return response

    return hook


class SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """urllib's redirect handler, refusing a redirect out of ``start``'s origin (urllib
    would re-send every header but Content-*, the token included)."""

    max_redirections = MAX_REDIRECTS

    def __init__(self, start: str) -> None:
        self.start = start

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        try:
            check(self.start, newurl)  # urllib made newurl absolute
        except CrossOriginRedirect:
            fp.close()
            raise
        return super().redirect_request(req, fp, code, msg, headers, newurl)
