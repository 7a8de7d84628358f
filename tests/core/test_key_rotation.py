"""Publish-before-use rotation decided on plain values (sts.core.key_rotation): tables of cases."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from sts.core.key_rotation import (
    ROTATION_SKEW_SECONDS,
    KeyEntry,
    KeyRotationRefused,
    RotationTiming,
    in_ring_order,
    initial_entries,
    plan_rotation,
    prunable,
    ring_problem,
)

NOW = 1_700_000_000.0
HOUR = 3600

ACTIVE = KeyEntry(
    kid="A", alg="ES256", state="active", created_at=NOW - 10 * HOUR, activated_at=NOW - 9 * HOUR
)
NEXT = KeyEntry(kid="N", alg="ES256", state="next", created_at=NOW - 2 * HOUR)
NEXT_RSA = KeyEntry(kid="R", alg="RS256", state="next", created_at=NOW - 2 * HOUR)
OLD = KeyEntry(
    kid="O",
    alg="ES256",
    state="retired",
    created_at=NOW - 30 * HOUR,
    activated_at=NOW - 29 * HOUR,
    retired_at=NOW - 9 * HOUR,
    publish_until=NOW + 60,
)


@dataclass(frozen=True)
class Case:
    id: str
    entries: tuple[KeyEntry, ...]
    min_published: int = HOUR
    force: bool = False
    next_alg: str | None = None
    #: None: refused with a message matching ``refused``; else the kid that signs afterwards
    #: ("new" for a key created by the rotation).
    signs: str | None = None
    refused: str = ""
    active_alg: str = "ES256"
    expected_next_alg: str = "ES256"


ROTATIONS = [
    Case("next published long enough is promoted", (ACTIVE, NEXT), signs="N"),
    Case("published exactly min_published is enough", (ACTIVE, NEXT), min_published=2 * HOUR, signs="N"),
    Case(
        "published one second too briefly is refused",
        (ACTIVE, NEXT),
        min_published=2 * HOUR + 1,
        refused=f"published for {2 * HOUR} s, less than the required {2 * HOUR + 1} s",
    ),
    Case("too brief but forced", (ACTIVE, NEXT), min_published=3 * HOUR, force=True, signs="N"),
    Case("no min_published: any next key", (ACTIVE, NEXT), min_published=0, signs="N"),
    Case("no next key is refused", (ACTIVE,), refused="the key ring has no next key to promote"),
    Case("no next key, forced: a fresh key signs at once", (ACTIVE,), force=True, signs="new"),
    Case("older retired keys are kept", (ACTIVE, OLD, NEXT), signs="N"),
    Case(
        "next_alg migrates the fresh next key only",
        (ACTIVE, NEXT),
        next_alg="RS256",
        signs="N",
        expected_next_alg="RS256",
    ),
    Case(
        "the promoted key keeps its own algorithm",
        (ACTIVE, NEXT_RSA),
        signs="R",
        active_alg="RS256",
        expected_next_alg="RS256",
    ),
]


@pytest.mark.parametrize("case", ROTATIONS, ids=[c.id for c in ROTATIONS])
def test_rotation_table(case: Case) -> None:
    timing = RotationTiming(max_token_lifetime=600, min_published=case.min_published)
    if case.signs is None:
        with pytest.raises(KeyRotationRefused, match=case.refused):
            plan_rotation(case.entries, NOW, timing, force=case.force, next_alg=case.next_alg)
        return
    plan = plan_rotation(case.entries, NOW, timing, force=case.force, next_alg=case.next_alg)
    assert plan.active_alg == case.active_alg
    assert plan.next_alg == case.expected_next_alg
    assert (plan.promoted is None) == (case.signs == "new")
    after = plan.entries_after(next_kid="F", active_kid="X" if case.signs == "new" else None)

    active, fresh, retired, *others = after
    assert active.state == "active" and active.activated_at == NOW
    assert active.kid == ("X" if case.signs == "new" else case.signs)
    assert active.alg == case.active_alg
    if case.signs == "new":
        assert active.created_at == NOW  # never published before it signs: only ever forced
    else:
        assert active.created_at == next(e for e in case.entries if e.kid == case.signs).created_at
    # The fresh next key is published from now on and does not sign.
    assert fresh == KeyEntry(kid="F", alg=case.expected_next_alg, state="next", created_at=NOW)
    # The former active key stays published until its last token has expired.
    assert retired.kid == "A" and retired.state == "retired" and retired.retired_at == NOW
    assert retired.publish_until == NOW + 600 + ROTATION_SKEW_SECONDS
    assert retired.activated_at == ACTIVE.activated_at
    assert others == [e for e in case.entries if e.kid not in {"A", active.kid}]
    assert [e.state for e in after].count("active") == 1 and ring_problem(after) is None


def test_the_plan_needs_exactly_the_keys_it_asked_for() -> None:
    timing = RotationTiming(max_token_lifetime=600)
    promoting = plan_rotation([ACTIVE, NEXT], NOW, timing)
    with pytest.raises(ValueError, match="needs no new active key"):
        promoting.entries_after(next_kid="F", active_kid="X")
    forced = plan_rotation([ACTIVE], NOW, timing, force=True)
    with pytest.raises(ValueError, match="needs a new active key"):
        forced.entries_after(next_kid="F")


def test_refusal_names_the_ring() -> None:
    with pytest.raises(KeyRotationRefused, match=r"^the key ring in /keys has no next key"):
        plan_rotation([ACTIVE], NOW, RotationTiming(600), ring_name="the key ring in /keys")


@pytest.mark.parametrize(("lifetime", "published"), [(-1, 0), (0, -1)])
def test_negative_windows_are_refused(lifetime: int, published: int) -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        RotationTiming(max_token_lifetime=lifetime, min_published=published)


def test_a_new_ring_signs_with_its_first_key_and_publishes_the_second() -> None:
    active, upcoming = initial_entries(active_kid="A", next_kid="N", alg="ES384", now=NOW)
    assert active == KeyEntry(kid="A", alg="ES384", state="active", created_at=NOW, activated_at=NOW)
    assert upcoming == KeyEntry(kid="N", alg="ES384", state="next", created_at=NOW)


@pytest.mark.parametrize(
    ("now", "pruned"),
    [
        (NOW + 59, []),  # one second before publish_until: still published
        (NOW + 60, ["O"]),  # at publish_until: every token it signed has expired
        (NOW + 10**9, ["O"]),  # never the active or next key, however late
    ],
)
def test_prunable_table(now: float, pruned: list[str]) -> None:
    assert [e.kid for e in prunable([ACTIVE, NEXT, OLD], now)] == pruned


def test_a_retired_key_without_publish_until_is_never_pruned() -> None:
    odd = KeyEntry(kid="Z", alg="ES256", state="retired", created_at=NOW, retired_at=NOW)
    assert prunable([odd], NOW + 10**9) == []


def test_ring_order_is_active_next_then_newest_retired() -> None:
    newer = KeyEntry(
        kid="P", alg="ES256", state="retired", created_at=NOW, retired_at=NOW - HOUR, publish_until=NOW + 1
    )
    assert [e.kid for e in in_ring_order([OLD, NEXT, newer, ACTIVE])] == ["A", "N", "P", "O"]


@pytest.mark.parametrize(
    ("entries", "problem"),
    [
        ((ACTIVE, NEXT, OLD), None),
        ((ACTIVE,), None),
        ((NEXT,), "expected exactly one active key, found 0"),
        ((ACTIVE, KeyEntry(kid="B", alg="ES256", state="active", created_at=NOW)), "found 2"),
        ((ACTIVE, NEXT, KeyEntry(kid="M", alg="ES256", state="next", created_at=NOW)), "at most one next"),
        ((ACTIVE, KeyEntry(kid="A", alg="ES256", state="next", created_at=NOW)), "a kid is listed twice"),
    ],
)
def test_ring_problem_table(entries: tuple[KeyEntry, ...], problem: str | None) -> None:
    found = ring_problem(entries)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found
