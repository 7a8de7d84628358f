"""The canonical JSON of :mod:`sts.core.canonical_json` is the text the earlier computation gave
(``canonical_json_reference.py``), and takes the pure-Python ``rfc8785`` path for the same values:
over random values with every kind the fast path must tell apart (integral, tiny and huge floats,
long integers, member names from U+E000 up, lone surrogates, non-string names, subclasses)."""

from __future__ import annotations

import enum
import random
from typing import Any

import pytest
import rfc8785

from sts.core import canonical_json as current
from tests.core import canonical_json_reference as reference


class Name(str):
    pass


class Count(int):
    pass


class Colour(enum.Enum):
    RED = "red"


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    alphabet = 'aZ09:,[]{}.e-+"\\/\x00\x1f\x7f é€\u2028\ud7ff\ue000\uffff😀\ud800'
    specials: list[Any] = [0.0, -0.0, 1.0, 300.0, 1e-4, 1e-5, 1e16, 2.0**53, float("nan"), float("inf")]
    specials += [2**53, 2**53 - 1, -(2**60), Name("n"), Count(3), True, None, Colour.RED, b"x", 1.5]

    def string() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))

    kind = rng.random()
    if depth > 3 or kind < 0.45:
        return rng.choice([string(), string(), rng.choice(specials), rng.randint(-1000, 1000), rng.random()])
    if kind < 0.7:
        items = [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
        return tuple(items) if rng.random() < 0.1 else items
    names: list[Any] = [string(), string(), "ascii", Name("sub"), 1, None]
    return {rng.choice(names): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _outcome(function: Any, value: Any) -> Any:
    try:
        return ("text", function(value))
    except Exception as exc:  # the kind of refusal is compared
        return ("raised", type(exc))


def test_the_text_is_the_earlier_computations() -> None:
    rng = random.Random(8785)
    for _ in range(6000):
        value = _random_value(rng)
        assert _outcome(current.canonical_json, value) == _outcome(reference.canonical_json, value), value


def test_the_same_values_take_the_pure_python_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    dumps = rfc8785.dumps

    def counting(value: Any) -> bytes:
        calls.append(value)
        return dumps(value)

    monkeypatch.setattr(rfc8785, "dumps", counting)
    rng = random.Random(1208)
    for _ in range(3000):
        value = _random_value(rng)
        del calls[:]
        _outcome(current.canonical_json, value)
        now = len(calls)
        del calls[:]
        _outcome(reference.canonical_json, value)
        assert now == len(calls), value


@pytest.mark.parametrize(
    "value",
    [
        {"\ue000": 1, "\U0001f600": 2},  # sorted differently by code points and by UTF-16 units
        {"a": [{"\uffff": 1.0}]},
        {"é": 1.0, "b": {"€": [1, 2.5]}},
        {"a": "\ud800"},
    ],
)
def test_names_from_u_e000_up_and_lone_surrogates_are_written_as_rfc8785_does(value: Any) -> None:
    assert _outcome(current.canonical_json, value) == _outcome(
        lambda v: rfc8785.dumps(v).decode("utf-8"), value
    )
