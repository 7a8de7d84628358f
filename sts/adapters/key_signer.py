"""The signer on the hot path: one compact JWS per issued token, with the ring's active key."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from joserfc import jwt

from .signing_keys import AsymmetricJWK


class KeySigner:
    """Signs with the active key; satisfies :class:`sts.core.ports.Signer`.

    The private key was parsed when the ring was loaded; signing never touches
    the disk.  ``repr`` shows the ``kid`` only.
    """

    __slots__ = ("_alg", "_key", "_kid")

    def __init__(self, key: AsymmetricJWK, kid: str, alg: str) -> None:
        self._key = key
        self._kid = kid
        self._alg = alg

    @property
    def alg(self) -> str:
        return self._alg

    @property
    def kid(self) -> str:
        return self._kid

    def sign(self, header: Mapping[str, Any], claims: Mapping[str, Any]) -> str:
        """Return the compact JWS (RFC 7515 §7.1) of ``claims``.

        ``alg`` and ``kid`` are set here, overriding any value in ``header``;
        the caller supplies the rest (``typ: at+jwt`` for RFC 9068 tokens).
        No ``typ`` is added when the caller gives none.
        """
        protected = {**header, "alg": self._alg, "kid": self._kid}
        return jwt.encode(protected, dict(claims), self._key, algorithms=[self._alg], default_type=None)

    def __repr__(self) -> str:
        return f"KeySigner(kid={self._kid!r}, alg={self._alg!r})"
