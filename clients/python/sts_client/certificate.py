"""Certificate-bound access tokens at the resource server (RFC 8705 §3).

A token whose ``cnf`` carries ``x5t#S256`` is bound to the client certificate the workload
presented when it was issued: "the protected resource MUST obtain the client certificate used
for mutual TLS authentication and MUST verify that the certificate matches the certificate
associated with the access token.  If they do not match, the resource access attempt MUST be
rejected with an error using HTTP status 401 and the ``invalid_token`` error code"
(RFC 8705 §3).  This resource server's TLS layer (or the proxy in front of it, which must
verify the chain and overwrite whatever header it forwards the certificate in) says which
certificate that is; :func:`certificate_thumbprint` computes what ``x5t#S256`` holds: the
base64url SHA-256 of its DER encoding (RFC 8705 §3.1).
"""

from __future__ import annotations

import base64
import hashlib
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

__all__ = ["ClientCertificate", "certificate_thumbprint"]

#: The certificate as the TLS layer gives it: DER bytes, or PEM (text or bytes); PEM that a proxy
#: URL-encoded (nginx ``$ssl_client_escaped_cert``) is read too.
ClientCertificate = bytes | str

_PEM_BEGIN = "-----BEGIN"


def certificate_thumbprint(certificate: ClientCertificate) -> str:
    """``x5t#S256`` of ``certificate`` (RFC 8705 §3.1).  Raises ``ValueError`` for anything that is
    not one certificate in DER or PEM."""
    if isinstance(certificate, bytes) and not certificate.lstrip().startswith(_PEM_BEGIN.encode()):
        der = x509.load_der_x509_certificate(certificate).public_bytes(Encoding.DER)
    else:
        text = certificate.decode("ascii") if isinstance(certificate, bytes) else certificate
        text = text.strip()
        if "%" in text:  # never in PEM itself (base64 and its armour lines)
            text = unquote(text).strip()
        der = x509.load_pem_x509_certificate(text.encode("ascii")).public_bytes(Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")
