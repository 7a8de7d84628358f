"""The clocks tests give the service: time is a parameter, and only the test moves it.

:class:`Clock` is the one the tests use (``tests/conftest.py`` has a ``clock`` fixture
that makes one at the current whole second).  It is a ``Callable[[], float]``, which is
what ``create_app(settings, clock=...)``, the stores, the JWKS caches and the client
library take.  Only the Redis tests of ``tests/adapters/test_stores.py`` and
``tests/adapters/test_replay_durability.py`` have a clock of their own, one that keeps
running, because Redis expires entries on the server's own clock.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Clock:
    """A clock that stands still at ``now`` until the test sets ``now`` or calls :meth:`advance`."""

    now: float

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
