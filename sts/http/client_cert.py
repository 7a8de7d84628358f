"""Client certificates forwarded by a trusted TLS-terminating proxy (RFC 8705 §3).

The proxy verifies the TLS client certificate and forwards it in a configured
header, as PEM, optionally URL-encoded (nginx ``$ssl_client_escaped_cert``,
envoy ``x-forwarded-client-cert`` ``Cert=`` element in quotes).  The header
is believed only on connections from ``trusted_proxies``; from anywhere else
it is ignored, so a client cannot claim a certificate it does not hold.
The token is bound to ``cnf.x5t#S256``: the base64url SHA-256 of the DER
certificate (RFC 8705 §3.1).
"""

from __future__ import annotations

import base64
import hashlib
import re
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

_ENVOY_CERT = re.compile(r'Cert="([^"]+)"')


def certificate_thumbprint(header_value: str) -> str | None:
    """``x5t#S256`` of the forwarded certificate, or None when it cannot be parsed."""
    value = header_value.strip()
    envoy = _ENVOY_CERT.search(value)
    if envoy:
        value = envoy.group(1)
    if "%" in value:
        value = unquote(value)
    try:
        cert = x509.load_pem_x509_certificate(value.encode("ascii"))
    except (ValueError, UnicodeError):
        return None
    digest = hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
