"""Time spent in each stage of one exchange, for ``benchmarks/exchange_cpu.py --stages LABEL``.

A profiler either samples (py-spy: which thread holds the GIL is a guess, and a few hundred
samples per stage are noise) or traces every call (cProfile: its per-call cost inflates code
that makes many small calls).  This wraps only the stages of the exchange, about thirty
functions, each with two readings of ``time.perf_counter``, and reports the wall time inside
each per request: inclusive of what it calls, so the rows nest (the exchange's own work is
its ``TokenExchange.handle``, the rest of ``WSGIOverRSGI._call`` is serving).  Run with
``--in-flight 0`` (the default), one request at a time, the wall time is the thread's CPU
time but for the store's round trips (none on SQLite).  A stage missing from the copy measured
(code from before it existed) is left out.
"""

from __future__ import annotations

import functools
import importlib
import sys
import time
from collections.abc import Callable
from typing import Any

#: (module, class or None, function) of each stage timed, outermost first.
STAGES: tuple[tuple[str, str | None, str], ...] = (
    ("sts.serving", "WSGIOverRSGI", "_call"),
    ("sts.http.token_fast", "LeanTokenEndpoint", "_serve"),
    ("sts.http.wire", None, "read_wire"),
    ("sts.http.responses", "Arrival", "__init__"),
    ("sts.http.responses", None, "json_text"),
    ("sts.adapters.tracing", "Tracing", "finish_request"),
    ("sts.http.oauth", "TokenEndpoint", "answer"),
    ("sts.core.exchange", "TokenExchange", "handle"),
    ("sts.core.exchange", "TokenExchange", "_decide"),
    ("sts.core.exchange.request", None, "parse_request"),
    ("sts.core.exchange", "TokenExchange", "_authenticate_client"),
    ("sts.core.exchange.binding", None, "verify_request_proof"),
    ("sts.core.dpop", None, "verify_proof"),
    ("sts.core.jose", None, "parse_compact"),
    ("sts.core.jose", None, "verify_compact_signature"),
    ("sts.core.claims", None, "check_claims"),
    ("sts.core.exchange.attestation", "Attestation", "attest"),
    ("sts.core.attest", None, "verify_token"),
    ("sts.core.exchange", "TokenExchange", "_evaluate_policy"),
    ("sts.core.exchange.risk_and_assurance", "RiskAndAssurance", "assess"),
    ("sts.adapters.sql.key_value", "KeyValueTable", "get_with"),
    ("sts.core.risk", None, "assess"),
    ("sts.core.exchange.risk_and_assurance", "RiskAndAssurance", "learn"),
    ("sts.core.exchange.issue", None, "mint_exchanged_token"),
    ("sts.adapters.key_signer", "KeySigner", "sign"),
    ("sts.core.exchange", "TokenExchange", "_commit"),
    ("sts.adapters.sql.audit_sink", "SqlAuditSink", "_stored_row"),
    ("sts.adapters.sql.group_commit", "GroupCommit", "join"),
    ("sts.adapters.sql.audit_sink", "SqlAuditSink", "_linked"),
    ("sts.adapters.sql.sqlite_grants", "SqliteGrants", "commit"),
    ("sts.adapters.sql.statements", "RawStatement", "run"),
    ("sts.adapters.sql.statements", "RawStatement", "query"),
)


class StageTimes:
    """Wraps :data:`STAGES` in the modules imported so far; :meth:`reset` and :meth:`per_request`."""

    def __init__(self) -> None:
        #: Per stage: calls and seconds.
        self.totals: dict[str, list[float]] = {}
        for module_name, owner_name, attribute in STAGES:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            owner: Any = getattr(module, owner_name, None) if owner_name else module
            function = None if owner is None else vars(owner).get(attribute)
            if not callable(function):
                continue
            short = owner_name or module_name.rsplit(".", 1)[-1]
            name = f"{short}.{attribute}"
            wrapped = self._timed(name, function)
            setattr(owner, attribute, wrapped)
            if owner_name is None:
                # A function imported by name elsewhere is called through that name too.
                for other in list(sys.modules.values()):
                    named = getattr(other, "__name__", "")
                    if named.startswith("sts") and getattr(other, attribute, None) is function:
                        setattr(other, attribute, wrapped)

    def _timed(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        total = self.totals.setdefault(name, [0, 0.0])
        clock = time.perf_counter

        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return function(*args, **kwargs)
            finally:
                total[0] += 1
                total[1] += clock() - start

        return timed

    def reset(self) -> None:
        for total in self.totals.values():
            total[0], total[1] = 0, 0.0

    def per_request(self, requests: int) -> dict[str, tuple[float, float]]:
        """Per stage, in :data:`STAGES` order: calls and microseconds per request."""
        totals = self.totals.items()
        return {name: (calls / requests, seconds / requests * 1e6) for name, (calls, seconds) in totals}


def print_stages(label: str, stages: dict[str, list[float]]) -> None:
    """The table of ``--stages``: each stage's microseconds and calls per request."""
    print(f"\nstages of {label}, wall µs per request (inclusive: the rows nest; one request at a time):")
    for name, (calls, micros) in stages.items():
        if calls:
            print(f"  {micros:8.1f} µs  {calls:5.2f} calls  {name}")
