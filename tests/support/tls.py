"""A certificate authority made on the fly (trustme), for HTTPS tests against local servers.

:func:`make_ca` writes the CA's certificate as a PEM file (what ``ca_bundle`` or ``SSL_CERT_FILE`` names);
:func:`server_context` gives a server an SSL context whose certificate that CA issued for the given names.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import trustme

__all__ = ["make_ca", "server_context"]


def make_ca(folder: Path) -> tuple[trustme.CA, str]:
    ca = trustme.CA()
    pem = folder / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    return ca, str(pem)


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    return ctx
