"""Edwards-curve public keys (JWK ``kty: OKP``, RFC 8037) that prove nothing: small order.

An Ed25519 or Ed448 public key ``A`` of small order (its order divides the curve's cofactor: 8
for Ed25519, 4 for Ed448) has no secret behind it: with ``R`` a small-order point as well and
``S = 0``, the RFC 8032 verification equation ``[S]B = R + [k]A`` holds for many messages, and
for the neutral point, for every message (the Edwards analogue of ECDSA's ``r = s = 0``
"psychic signature").  OpenSSL, and so ``cryptography``, verify by RFC 8032 and accept such a
signature, so a key taken from the sender (a DPoP proof's ``jwk``, RFC 9449 §4.2) must be
looked at first: a proof signed so proves possession of no key (RFC 9449 §4.3; RFC 8725 §3.5).

Both curves' small-order points are few, and a point and its negation share their
``y``-coordinate, so the check reads the encoded ``y`` (RFC 8032 §5.1.2, §5.2.2: little-endian,
the top bit the sign of ``x``): a non-canonical ``y`` (``>= p``, which RFC 8032 §5.1.3 and
§5.2.3 refuse to decode) or one of the small-order ``y`` values is refused.  The values are
those of libsodium's ``ge25519_has_small_order`` list; ``tests/core/test_okp_keys.py`` checks
each against the curve.  Pure: no I/O.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

_ED25519_P = 2**255 - 19
_ED448_P = 2**448 - 2**224 - 1
#: RFC 8032 §5.1.2, §5.2.2: the length of a public key's encoding.
_KEY_BYTES = {"Ed25519": 32, "Ed448": 57}

#: By curve: its field prime, and the ``y``-coordinates of its points of small order.
SMALL_ORDER_Y: Mapping[str, tuple[int, frozenset[int]]] = {
    # 1: the neutral point; p - 1: order 2; 0: order 4; the other two: order 8.
    "Ed25519": (
        _ED25519_P,
        frozenset(
            {
                0,
                1,
                _ED25519_P - 1,
                0x05FC536D880238B13933C6D305ACDFD5F098EFF289F4C345B027B2C28F95E826,
                0x7A03AC9277FDC74EC6CC392CFA53202A0F67100D760B3CBA4FD84D3D706A17C7,
            }
        ),
    ),
    # 1: the neutral point; p - 1: order 2; 0: order 4 (x = 1 or -1).
    "Ed448": (_ED448_P, frozenset({0, 1, _ED448_P - 1})),
}


def okp_key_problem(jwk: Mapping[str, Any]) -> str | None:
    """Why an ``OKP`` JWK's Ed25519 or Ed448 public key ``x`` must not verify a signature, or None.

    Any other curve (X25519, X448: not signature keys) or an ``x`` that is not base64url of the
    curve's length is left to the key import, which refuses it."""
    curve = SMALL_ORDER_Y.get(str(jwk.get("crv")))
    value = jwk.get("x")
    if curve is None or not isinstance(value, str):
        return None
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except ValueError:
        return None
    prime, small = curve
    if len(raw) != _KEY_BYTES[str(jwk.get("crv"))]:
        # Empty (``""``, ``"===="``), short or long: no point of the curve (and no shift below).
        return f"x is not {_KEY_BYTES[str(jwk.get('crv'))]} bytes (RFC 8037 §2)"
    y = int.from_bytes(raw, "little") & ~(1 << (8 * len(raw) - 1))
    if y >= prime:
        return "x is not a canonical point encoding (RFC 8032 §5.1.3, §5.2.3)"
    if y in small:
        return "x is a point of small order: signatures verify without any private key"
    return None
