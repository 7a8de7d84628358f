"""Client certificates forwarded by a trusted TLS-terminating proxy (RFC 8705 §3).

The proxy verifies the TLS client certificate and forwards it in a configured header, in one
of these forms:

* PEM, optionally URL-encoded (nginx ``$ssl_client_escaped_cert``, AWS ALB
  ``X-Amzn-Mtls-Clientcert``);
* base64 DER, the PEM without its armour, optionally URL-encoded (Traefik's
  ``X-Forwarded-Tls-Client-Cert``, Caddy's ``certificate_der_base64``);
* envoy's ``x-forwarded-client-cert`` (XFCC): one element of ``key=value`` pairs, the
  certificate in ``Cert="<URL-encoded PEM>"`` or, without it, its SHA-256 in ``Hash=<hex>``
  (https://www.envoyproxy.io/docs/envoy/latest/configuration/http/http_conn_man/headers#x-forwarded-client-cert).

The header is believed only on connections from ``trusted_proxies``; from anywhere else it is
ignored, so a client cannot claim a certificate it does not hold.  From a trusted proxy it must
hold exactly one certificate, else the request is refused (:class:`UnreadableCertificate`;
fail closed: a token is never issued unbound because its certificate could not be read):

* XFCC with more than one element is refused: envoy's ``APPEND_FORWARD`` keeps the elements
  the client sent and adds its own after them, so any element but the proxy's may be the
  client's writing (a victim's certificate is public).  Configure envoy with
  ``forward_client_cert_details: SANITIZE_SET``, which replaces the header;
* a value holding two certificates (a chain, or the header sent twice, which the server joins
  with a comma, RFC 9110 §5.3) is refused: forward the client's own certificate only.

The token is bound to ``cnf.x5t#S256``: the base64url SHA-256 of the DER certificate
(RFC 8705 §3.1).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

_PEM_BEGIN = "-----BEGIN CERTIFICATE-----"
_PEM_END = "-----END CERTIFICATE-----"
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_HEX_SHA256 = re.compile(r"[0-9A-Fa-f]{64}")
# An XFCC element: ``key=value`` pairs separated by ``;``, a value quoted when it holds ``,;=``.
_XFCC_KEY = re.compile(r"\s*(By|Hash|Cert|Chain|Subject|URI|DNS)=", re.IGNORECASE)
# No two parts can match the same character (an unquoted value keeps its spaces, stripped after):
# one pass, whatever the value (with ``\s*`` after the value as well, a run of spaces was
# backtracked over quadratically, seconds of a worker for one header: an outside audit).
_XFCC_PAIR = re.compile(r' *([A-Za-z]+)=("(?:[^"\\]|\\.)*"|[^;,"]*)(;|,|$)')
#: The longest header value read (a certificate is 1 to 4 KB as URL-encoded PEM).
MAX_HEADER_CHARS = 16384


class UnreadableCertificate(ValueError):
    """The forwarded header is present but does not hold exactly one certificate in a known form."""


def certificate_thumbprint(header_value: str) -> str | None:
    """``x5t#S256`` of the forwarded certificate; None when the value is empty (no certificate).

    Raises :class:`UnreadableCertificate` for anything else that is not one certificate.
    """
    value = header_value.strip()
    if not value:
        return None
    if len(value) > MAX_HEADER_CHARS:
        raise UnreadableCertificate(f"longer than {MAX_HEADER_CHARS} characters")
    if _XFCC_KEY.match(value):
        return _xfcc_thumbprint(value)
    return _thumbprint(_one_certificate(value))


def _thumbprint(cert: x509.Certificate) -> str:
    digest = hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _one_certificate(value: str) -> x509.Certificate:
    """The one certificate of a PEM or base64 DER value, either optionally URL-encoded."""
    if "," in value:
        raise UnreadableCertificate("more than one value (a chain, or the header repeated)")
    try:
        if "%" in value:
            value = unquote(value, errors="strict").strip()
        if value.startswith(_PEM_BEGIN):
            # One block and nothing after it (cryptography reads the first block and ignores the
            # rest, a second certificate under another label included: an outside audit).
            if value.count("-----BEGIN ") != 1 or not value.endswith(_PEM_END):
                raise UnreadableCertificate("not exactly one PEM certificate")
            return x509.load_pem_x509_certificate(value.encode("ascii"))
        compact = "".join(value.split())
        if not _BASE64.fullmatch(compact):
            raise UnreadableCertificate("neither PEM nor base64 DER")
        return x509.load_der_x509_certificate(base64.b64decode(compact, validate=True))
    except (ValueError, UnicodeError, binascii.Error) as exc:
        if isinstance(exc, UnreadableCertificate):
            raise
        raise UnreadableCertificate("not a certificate") from None


def _xfcc_thumbprint(value: str) -> str:
    """The certificate of an XFCC header of one element (see the module docstring)."""
    pairs: dict[str, str] = {}
    position = 0
    while position < len(value):
        match = _XFCC_PAIR.match(value, position)
        if match is None or match.end() == position:
            raise UnreadableCertificate("not an x-forwarded-client-cert element")
        key, raw, separator = match.group(1).lower(), match.group(2), match.group(3)
        if separator == ",":
            raise UnreadableCertificate("x-forwarded-client-cert holds more than one element")
        if key in pairs and key in ("cert", "hash"):
            raise UnreadableCertificate(f"x-forwarded-client-cert repeats {key}")
        pairs[key] = raw[1:-1].replace('\\"', '"') if raw.startswith('"') else raw
        position = match.end()
    if "cert" in pairs:
        thumbprint = _thumbprint(_one_certificate(pairs["cert"]))
        if "hash" in pairs and _hash_thumbprint(pairs["hash"]) != thumbprint:
            raise UnreadableCertificate("x-forwarded-client-cert Hash and Cert disagree")
        return thumbprint
    if "hash" in pairs:
        return _hash_thumbprint(pairs["hash"])
    raise UnreadableCertificate("x-forwarded-client-cert names no certificate")


def _hash_thumbprint(hex_digest: str) -> str:
    if not _HEX_SHA256.fullmatch(hex_digest):
        raise UnreadableCertificate("x-forwarded-client-cert Hash is not a SHA-256")
    return base64.urlsafe_b64encode(bytes.fromhex(hex_digest)).rstrip(b"=").decode("ascii")
