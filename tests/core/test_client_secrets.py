"""Slow client-secret hashes (sts/core/client_secrets.py): checked once per secret, paused after a failure."""

from __future__ import annotations

import time

import pytest

from sts.core import client_secrets
from sts.core.client_secrets import FAILURE_PAUSE, SecretChecksPaused, check_secrets, hash_secret


def _timed(*args: object) -> tuple[bool, float]:
    started = time.process_time()
    ok = check_secrets(*args)  # type: ignore[arg-type]
    return ok, time.process_time() - started


def test_a_slow_hash_verifies_a_secret_once_and_recognises_it_afterwards() -> None:
    """Every request of a client with a chosen secret cost a PBKDF2 check (0.2 to 0.3 s of CPU)."""
    secret = "a secret an operator chose"
    stored = hash_secret(secret, slow=True)
    ok, first = _timed([secret], stored)
    assert ok and first > 0.05
    ok, again = _timed([secret], stored)
    assert ok and again < 0.01
    # The literal and the decoded form are both candidates; a fast hash is unaffected.
    assert check_secrets(["other", secret], stored)
    fast = hash_secret(secret)
    assert (
        check_secrets([secret], fast)
        and not check_secrets(["wrong"], fast)
        and not check_secrets(["x"], None)
    )


def test_after_a_failure_a_slow_hash_checks_no_new_secret_for_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client id with wrong secrets kept a CPU busy (an outside audit): one slow check per pause."""
    now = [1000.0]
    monkeypatch.setattr(client_secrets._SLOW, "clock", lambda: now[0])
    secret = "the operator's chosen secret"
    stored = hash_secret(secret, slow=True)
    assert check_secrets([secret], stored)  # verified once: remembered
    assert not check_secrets(["wrong secret"], stored)  # a slow check, which fails
    started = time.process_time()
    with pytest.raises(SecretChecksPaused):
        check_secrets(["another wrong one"], stored)
    assert time.process_time() - started < 0.01  # not checked at all
    assert check_secrets([secret], stored)  # the known secret still passes, at once
    now[0] += FAILURE_PAUSE
    assert not check_secrets(["another wrong one"], stored)  # checked again after the pause


def test_the_hash_an_unknown_name_is_checked_against_costs_what_the_dearest_users_does() -> None:
    """The review page checks a name that is no user's against this hash, so that it takes as long
    as the slowest user's: the highest PBKDF2 count among the users, made without doing the work
    (its digest is random: no secret matches it).  It was a PBKDF2 hash of the default count, made
    at the first unknown name: a user with another count was told apart by time (an outside audit)."""
    fast = hash_secret("generated")
    cheap = "pbkdf2-sha256$200000$" + hash_secret("x", slow=True).split("$", 2)[2]
    slow = hash_secret("chosen", slow=True)
    dearer = "pbkdf2-sha256$900000$" + slow.split("$", 2)[2]
    assert client_secrets.check_hash_format(cheap) and client_secrets.check_hash_format(dearer)
    started = time.process_time()
    dummy = client_secrets.dummy_hash_like([fast, cheap, dearer, slow])
    assert time.process_time() - started < 0.05  # made without the work
    assert dummy.startswith("pbkdf2-sha256$900000$") and client_secrets.check_hash_format(dummy)
    assert dummy != client_secrets.dummy_hash_like([dearer])  # random: nothing to precompute
    assert not client_secrets.verify_secret("chosen", dummy)
    only_fast = client_secrets.dummy_hash_like([fast])
    assert only_fast.startswith("sha256$") and client_secrets.check_hash_format(only_fast)
