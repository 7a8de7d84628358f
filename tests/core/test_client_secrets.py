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
