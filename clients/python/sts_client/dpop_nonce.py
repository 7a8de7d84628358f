"""Resource-server-provided DPoP nonces (RFC 9449 §9), without server-side state.

A resource server that wants proofs it can date by its own clock, not the
client's ``iat``, demands a nonce::

    nonces = DPoPNonces(secret=os.environb[b"RS_DPOP_NONCE_SECRET"])
    verifier = TokenVerifier(issuer, audience, dpop_nonces=nonces)

A DPoP-bound request whose proof carries no nonce, or one this server did not
issue recently, is refused with RFC 9449 §9's challenge, and the answer holds
the nonce to use in a ``DPoP-Nonce`` header::

    HTTP/1.1 401 Unauthorized
    WWW-Authenticate: DPoP error="use_dpop_nonce",
      error_description="Resource server requires nonce in DPoP proof", algs="ES256 ..."
    DPoP-Nonce: AAAAAAG5Fh8Vx...

The client library (:class:`sts_client.workload.StsAuth`) retries such a
request once with the nonce.  An accepted request whose proof used an older
nonce gets the current one in ``VerifiedAccessToken.dpop_nonce``, which the
Flask decorator and the WSGI middleware send as ``DPoP-Nonce`` (§9: "the
server MAY supply a new nonce value ... in subsequent responses").

A nonce is the period it was issued in and an HMAC-SHA-256 of that period
under ``secret`` (base64url, 32 characters); every client gets the same nonce
within a period of ``lifetime / 2`` seconds, and a nonce is accepted in its
period and the next, so for between ``lifetime / 2`` and ``lifetime`` seconds.
A nonce dated in the future is refused.  All the processes of one resource
server must share ``secret`` (at least 32 bytes); without one, each process
draws its own and a nonce is good only at the process that issued it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
import time
from collections.abc import Callable
from typing import Final

__all__ = ["DPoPNonces"]

_LABEL: Final = b"sts-client DPoP nonce v1\x00"
_PERIOD: Final = struct.Struct(">Q")
_MAC_BYTES: Final = 16
_NONCE_CHARS: Final = 32  # base64url of 8 + 16 bytes, unpadded


class DPoPNonces:
    """Issues and checks a resource server's DPoP nonces (see the module docstring)."""

    def __init__(
        self,
        secret: bytes | None = None,
        *,
        lifetime: int = 300,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if secret is not None and len(secret) < 32:
            raise ValueError("a DPoP nonce secret needs at least 32 bytes")
        if lifetime < 2:
            raise ValueError("a DPoP nonce lifetime is at least 2 seconds")
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self._period_seconds = lifetime / 2
        self._clock = clock

    def _period(self, now: float | None) -> int:
        return int((self._clock() if now is None else now) // self._period_seconds)

    def _mac(self, period: bytes) -> bytes:
        return hmac.new(self._secret, _LABEL + period, hashlib.sha256).digest()[:_MAC_BYTES]

    def current(self, now: float | None = None) -> str:
        """The nonce to hand out now."""
        period = _PERIOD.pack(self._period(now))
        return base64.urlsafe_b64encode(period + self._mac(period)).decode("ascii").rstrip("=")

    def accepts(self, nonce: object, now: float | None = None) -> bool:
        """Whether ``nonce`` (from a proof's ``nonce`` claim) was issued here, in this period or the last."""
        if not isinstance(nonce, str) or len(nonce) != _NONCE_CHARS:
            return False
        try:
            raw = base64.urlsafe_b64decode(nonce.encode("ascii"))
        except (UnicodeEncodeError, binascii.Error, ValueError):
            return False
        if base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=") != nonce:
            return False  # Exactly the text issued, not another spelling of its bytes (``+/``).
        period, mac = raw[: _PERIOD.size], raw[_PERIOD.size :]
        if not hmac.compare_digest(mac, self._mac(period)):
            return False
        age = self._period(now) - int(_PERIOD.unpack(period)[0])
        return 0 <= age <= 1

    def is_current(self, nonce: str | None, now: float | None = None) -> bool:
        """Whether ``nonce`` is the one :meth:`current` gives now (no fresher one to send)."""
        # As bytes: compare_digest raises on a str holding other than ASCII.
        return nonce is not None and hmac.compare_digest(
            nonce.encode("utf-8", "surrogatepass"), self.current(now).encode("ascii")
        )
