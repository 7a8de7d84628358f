"""Health probes on a lane of their own, so that a busy worker still answers them on time.

``/livez``, ``/readyz`` and ``/healthz`` run on one thread of their own in each worker, not on
the request threads.  Before, a probe queued behind the requests: while every request thread
waited on a frozen database (each wait bounded by ``database_deadline``), ``/readyz`` answered
after 3 to 4 seconds instead of within its own 2 s deadline, and ``/livez`` was as late, so an
orchestrator could take a worker waiting on its database for a stuck one.

Liveness says more than "the process is up": a worker whose request threads hold calls and have
finished none for :attr:`~sts.serving.Limits.liveness_stall` seconds (60 by default: every wait
of a request is bounded well below that: statement and lock deadlines, store and fetch timeouts)
is stuck, and ``/livez`` answers ``503`` so that the orchestrator restarts it.  That answer comes
from here, without the application: its request threads are the ones stuck.
"""

from __future__ import annotations

import json

#: The paths answered on the probe lane (any method: the application answers what it allows).
PROBE_PATHS = frozenset({"/livez", "/readyz", "/healthz"})
#: The liveness probe, which reports a stall of the request threads.
LIVENESS_PATH = "/livez"

_HEADERS = [
    ("Content-Type", "application/json"),
    ("Cache-Control", "no-store"),
    ("Pragma", "no-cache"),
    ("X-Content-Type-Options", "nosniff"),
]
_STALLED = json.dumps({"status": "stalled", "problems": ["request_threads"]}, separators=(",", ":")).encode()


def stalled_answer() -> tuple[int, list[tuple[str, str]], bytes]:
    """``/livez``'s answer for a worker whose request threads are stuck."""
    return 503, list(_HEADERS), _STALLED
