"""Gateway facts: the certificate a node's gateway serves."""

from __future__ import annotations

import shlex

from pyinfra.api import FactBase


class Certificate(FactBase):
    """
    The first certificate (the leaf) of a PEM file, as PEM text, or ``None`` when the file
    is missing or holds no certificate. Only the certificate, which is public: ``openssl
    x509`` prints it and never the private key the same file holds (HAProxy's ``crt`` file
    carries both), so ``-vvv`` prints nothing secret.

    .. code:: python

        "-----BEGIN CERTIFICATE-----\\nMIIB...\\n-----END CERTIFICATE-----"
    """

    def requires_command(self, path: str) -> str:
        return "openssl"

    def command(self, path: str) -> str:
        q = shlex.quote(path)
        return f"if [ -f {q} ]; then openssl x509 -in {q} -outform PEM 2>/dev/null || true; fi"

    def process(self, output: list[str]) -> str | None:
        text = "\n".join(line.strip() for line in output).strip()
        begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
        if not text.startswith(begin) or not text.endswith(end):
            return None
        return text + "\n"
