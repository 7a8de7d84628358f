"""What the key ring publishes: its JWK Set, and the keys that verify our own tokens.

:class:`RingView` is everything a request needs from the ring, parsed once when
the ring is loaded and swapped as a whole on a reload: the entries, the
signer of the active key, and the public part of every published key
(``next``, ``active`` and not yet pruned ``retired``).  :class:`OwnTokenKeys`
verifies a token of ours that comes back (re-exchange, delegation chains)
against exactly those keys.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from joserfc.jwk import Key

from sts.core.key_rotation import KeyEntry

from .jwks import StaticJWKS
from .key_signer import KeySigner
from .keyring_metadata import FileId
from .signing_keys import AsymmetricJWK, public_part


@dataclass(frozen=True, slots=True)
class RingView:
    """The ring as loaded from disk; immutable, so readers need no lock."""

    entries: tuple[KeyEntry, ...]
    signer: KeySigner
    jwks: Mapping[str, Any]
    public_keys: tuple[AsymmetricJWK, ...]
    file_id: FileId
    #: When the first retired key's publication ends (its ``publish_until``); inf when none does.
    lapses_at: float = math.inf

    @classmethod
    def build(cls, entries: Sequence[KeyEntry], keys: Sequence[AsymmetricJWK], file_id: FileId) -> RingView:
        """The view of ``entries`` (in ring order, exactly one active) and their private ``keys``, pairwise.

        The JWK Set (RFC 7517 §5) lists each key's public part with ``kid``
        (RFC 7638 thumbprint), ``alg`` and ``use: "sig"`` (RFC 7517 §4.2-4.5).
        """
        signer: KeySigner | None = None
        public_keys: list[AsymmetricJWK] = []
        for entry, key in zip(entries, keys, strict=True):
            if entry.state == "active":
                signer = KeySigner(key, entry.kid, entry.alg)
            public_keys.append(public_part(key, kid=entry.kid, alg=entry.alg))
        assert signer is not None  # keyring.json is refused unless it has exactly one active key
        return cls._of(tuple(entries), signer, tuple(public_keys), file_id)

    @classmethod
    def _of(
        cls,
        entries: tuple[KeyEntry, ...],
        signer: KeySigner,
        public_keys: tuple[AsymmetricJWK, ...],
        file_id: FileId,
    ) -> RingView:
        ends = [e.publish_until for e in entries if e.state == "retired" and e.publish_until is not None]
        return cls(
            entries=entries,
            signer=signer,
            jwks={"keys": [k.as_dict(private=False) for k in public_keys]},
            public_keys=public_keys,
            file_id=file_id,
            lapses_at=min(ends, default=math.inf),
        )

    def published_at(self, now: float) -> RingView:
        """This view without the retired keys whose publication ended by ``now`` (``publish_until``):
        no token they signed is valid any more, so they verify nothing and leave the JWK Set, also
        before ``sts keys prune`` deletes them."""
        if now < self.lapses_at:
            return self
        kept = [
            (entry, key)
            for entry, key in zip(self.entries, self.public_keys, strict=True)
            if not (entry.state == "retired" and (entry.publish_until or math.inf) <= now)
        ]
        return RingView._of(tuple(e for e, _ in kept), self.signer, tuple(k for _, k in kept), self.file_id)


class PublishingRing(Protocol):
    """What :class:`OwnTokenKeys` needs of :class:`~sts.adapters.keyring.KeyRing`."""

    def reload_if_changed(self, now: float) -> Any: ...

    def public_jwks(self, now: float | None = None) -> Mapping[str, Any]: ...


class OwnTokenKeys:
    """:class:`sts.core.ports.IssuerKeys` over this service's own published keys.

    Used when one of our tokens comes back as a subject or actor token
    (re-exchange, delegation chains): it verifies against exactly the keys
    our JWKS publishes, and follows rotations done by another process.
    """

    def __init__(self, ring: PublishingRing, clock: Callable[[], float] = time.time) -> None:
        self._ring = ring
        self._clock = clock
        self._cached: tuple[tuple[str, ...], StaticJWKS] | None = None

    def key_for(self, kid: str | None, alg: str) -> Key:
        self._ring.reload_if_changed(self._clock())
        jwks = self._ring.public_jwks(self._clock())
        kids = tuple(sorted(k["kid"] for k in jwks["keys"]))
        cached = self._cached
        if cached is None or cached[0] != kids:
            algs = sorted({k["alg"] for k in jwks["keys"]})
            cached = (kids, StaticJWKS(jwks, algorithms=algs, source="this service's key ring"))
            self._cached = cached
        return cached[1].key_for(kid, alg)
