"""Config files gpunode renders with jinja2 from ``templates/`` (no HTML: no autoescape)."""

from __future__ import annotations

import jinja2

from gpunode.paths import TEMPLATES


def environment(*subdirs: str) -> jinja2.Environment:
    """A jinja2 environment over ``templates/<subdir>`` for each subdir; undefined
    variables are errors."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader([TEMPLATES / d for d in subdirs]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # noqa: S701 - nftables, sshd and sysctl text, not HTML
    )
