"""Small-order Edwards keys (sts/core/okp_keys.py): the listed values checked against the curves."""

from __future__ import annotations

import base64

import pytest
from joserfc.jwk import OKPKey

from sts.core.okp_keys import SMALL_ORDER_Y, okp_key_problem

# The curves of RFC 8032 §5.1 and §5.2: a x^2 + y^2 = 1 + d x^2 y^2 over GF(p), with their cofactors.
_CURVES = {
    "Ed25519": (-1, lambda p: -121665 * pow(121666, p - 2, p) % p, 8, 32),
    "Ed448": (1, lambda p: -39081 % p, 4, 57),
}


def _add(a: int, d: int, p: int, one: tuple[int, int], two: tuple[int, int]) -> tuple[int, int]:
    (x1, y1), (x2, y2) = one, two
    t = d * x1 * x2 * y1 * y2 % p
    return (x1 * y2 + y1 * x2) * pow(1 + t, p - 2, p) % p, (y1 * y2 - a * x1 * x2) * pow(1 - t, p - 2, p) % p


def _times(k: int, a: int, d: int, p: int, point: tuple[int, int]) -> tuple[int, int]:
    result = (0, 1)
    for _ in range(k):
        result = _add(a, d, p, result, point)
    return result


def _x_squared(a: int, d: int, p: int, y: int) -> int:
    return (y * y - 1) * pow(d * y * y - a, p - 2, p) % p


def _sqrt(value: int, p: int) -> int | None:
    """A square root mod p (p = 5 mod 8 for Ed25519, 3 mod 4 for Ed448), or None."""
    if p % 8 == 5:
        root = pow(value, (p + 3) // 8, p)
        if root * root % p != value:
            root = root * pow(2, (p - 1) // 4, p) % p
    else:
        root = pow(value, (p + 1) // 4, p)
    return root if root * root % p == value else None


@pytest.mark.parametrize("curve", list(SMALL_ORDER_Y))
def test_each_listed_y_is_a_point_of_small_order(curve: str) -> None:
    a, d_of, cofactor, _size = _CURVES[curve]
    p, small = SMALL_ORDER_Y[curve]
    d = d_of(p)
    for y in small:
        x = _sqrt(_x_squared(a, d, p, y), p)
        assert x is not None, f"{curve}: y={y:#x} is on no point"
        assert _times(cofactor, a, d, p, (x, y)) == (0, 1), f"{curve}: y={y:#x} is not of small order"
    # And none is missing: the small-order points are the cofactor many, two per y but for x = 0.
    points = sum(1 if _sqrt(_x_squared(a, d, p, y), p) == 0 else 2 for y in small)
    assert points == cofactor


def _jwk(curve: str, y: int, sign: int = 0) -> dict[str, str]:
    size = _CURVES[curve][3]
    raw = (y | sign << (8 * size - 1)).to_bytes(size, "little")
    return {"kty": "OKP", "crv": curve, "x": base64.urlsafe_b64encode(raw).rstrip(b"=").decode()}


@pytest.mark.parametrize("curve", list(SMALL_ORDER_Y))
def test_small_order_and_non_canonical_keys_are_refused_and_real_keys_pass(curve: str) -> None:
    p, small = SMALL_ORDER_Y[curve]
    for y in small:
        for sign in (0, 1):
            problem = okp_key_problem(_jwk(curve, y, sign))
            assert problem is not None and "small order" in problem
    # y >= p has no point in RFC 8032's decoding (p + 1 would read as the neutral point).
    for y in (p, p + 1):
        problem = okp_key_problem(_jwk(curve, y))
        assert problem is not None and "canonical" in problem
    for _ in range(20):
        assert okp_key_problem(OKPKey.generate_key(curve).as_dict(private=False)) is None
    # Not a signature key, or not this function's to judge: left to the import.
    assert okp_key_problem({"kty": "OKP", "crv": "X25519", "x": _jwk(curve, 1)["x"]}) is None
    assert okp_key_problem({"kty": "OKP", "crv": curve, "x": 5}) is None
    # Empty, short or long: refused, never a "negative shift count" (a 500 on a DPoP proof, and a
    # JWKS refresh that failed, found by an outside audit in the client library's copy).
    for x in ("", "====", "AA", _jwk(curve, 9)["x"] + "AAAA"):
        problem = okp_key_problem({"kty": "OKP", "crv": curve, "x": x})
        assert problem is not None and "bytes" in problem, x
