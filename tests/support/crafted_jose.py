"""Crafted JOSE for the attack tests: exact bytes signed by real keys, weak keys, a JWK Set server.

RFC 7515 §5.2 and RFC 7519 §7.2 require the header and the claims set to be
UTF-8 JSON.  To show that a token in UTF-16, UTF-32 or with a byte-order mark
is refused (issue 8), a test signs those bytes itself (:func:`sign_encoded`):
a real signature by a real key, so only the encoding can be the reason for a
refusal.  Key sets that no well-behaved issuer publishes (an RSA key with
``e = 3``, a short key, a symmetric key) are served over real HTTP on
loopback by :class:`KeySetServer`.
"""

from __future__ import annotations

import base64
import datetime
import json
import threading
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from joserfc.jwk import ECKey, Key, RSAKey
from joserfc.jws import JWSRegistry
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

#: Encodings Python's ``json.loads(bytes)`` detects and reads, none of them allowed in a JWS.
#: ``utf-16`` and ``utf-32`` write a byte-order mark; the ``-le``/``-be`` forms do not.
NOT_UTF8: dict[str, str] = {
    "utf16-bom": "utf-16",
    "utf16-le": "utf-16-le",
    "utf16-be": "utf-16-be",
    "utf32-bom": "utf-32",
    "utf32-le": "utf-32-le",
    "utf8-bom": "utf-8-sig",
}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def json_bytes(value: object, encoding: str = "utf-8") -> bytes:
    return json.dumps(value, separators=(",", ":")).encode(encoding)


def sign_bytes(key: Key, alg: str, header: bytes, payload: bytes) -> str:
    """``header`` and ``payload`` exactly as given, base64url-encoded and signed with ``key``."""
    signing_input = f"{b64url(header)}.{b64url(payload)}"
    signature = JWSRegistry(algorithms=[alg]).get_alg(alg).sign(signing_input.encode("ascii"), key)
    return f"{signing_input}.{b64url(signature)}"


def sign_encoded(
    key: Key,
    header: dict[str, Any],
    claims: dict[str, Any],
    *,
    encoding: str,
    part: str = "payload",
) -> str:
    """A JWS whose ``part`` (``payload`` or ``header``) is JSON in ``encoding``, the other UTF-8."""
    alg = str(header["alg"])
    header_bytes = json_bytes(header, encoding if part == "header" else "utf-8")
    payload_bytes = json_bytes(claims, encoding if part == "payload" else "utf-8")
    return sign_bytes(key, alg, header_bytes, payload_bytes)


def rsa_key_with_exponent_3(kid: str = "e3") -> RSAKey:
    """A 2048-bit RSA key with public exponent 3 (cryptography still makes them, "for legacy")."""
    private = rsa.generate_private_key(public_exponent=3, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key = RSAKey.import_key(pem, {"kid": kid, "use": "sig", "alg": "RS256"})
    assert key.as_dict(private=False)["e"] == "Aw"
    return key


class KeySetServer:
    """A loopback HTTP server publishing whatever JWK Set the test sets, counting requests."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.requests = 0
        self._server = make_server("127.0.0.1", 0, self._app, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}/jwks"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._thread.start()

    @Request.application
    def _app(self, request: Request) -> Response:
        self.requests += 1
        return Response(json.dumps(self.document), mimetype="application/json")

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def self_signed_x5c(key: RSAKey | ECKey) -> list[str]:
    """An attacker's self-signed certificate for ``key``, as an ``x5c`` header value (kept small)."""
    private = key.private_key
    assert isinstance(private, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a")])
    start = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
        .sign(private, hashes.SHA256())
    )
    return [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode("ascii")]


def unsupported_x5c() -> list[str]:
    """An ``x5c`` whose certificate names a key algorithm no library knows (its EC key's OID,
    ``id-ecPublicKey``, changed): reading its key raises ``UnsupportedAlgorithm``, which is no
    ``ValueError`` (a proof carrying it was answered ``500``; a review)."""
    der = base64.b64decode(self_signed_x5c(ECKey.generate_key("P-256"))[0])
    known, unknown = bytes.fromhex("06072a8648ce3d0201"), bytes.fromhex("06072a8648ce3d0209")
    assert der.count(known) == 1
    return [base64.b64encode(der.replace(known, unknown)).decode("ascii")]
