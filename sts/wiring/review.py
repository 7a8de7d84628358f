"""The review page (``review.enabled``): its blueprint, given what it reads."""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import redis
from sqlalchemy import Engine

from ..adapters.request_threads import waiting
from ..core.client_secrets import check_hash_format
from ..core.ports import BaselineStore, RevokedTokens
from ..core.rate_limit import Limit, RateLimiter, RateLimitPolicy
from ..errors import ConfigurationError
from ..settings import Settings
from .secret_files import secret_file
from .stores import rate_limit_store

#: The rate-limit endpoint of review sign-ins, and its limits: everyone together, per source network
#: (``rate_limits.ipv4_prefix``/``ipv6_prefix``) and per user name tried.  A password hash costs
#: about 0.15 s of CPU (PBKDF2, 600,000 iterations): 60 a minute spend at most a sixth of one core.
SIGN_IN = "review_sign_in"
SIGN_IN_LIMITS: Mapping[str, Limit] = {
    "global": Limit(requests=60, period=60, burst=20),
    "network": Limit(requests=10, period=60, burst=10),
    "client": Limit(requests=5, period=60, burst=5),
}


#: How many of the newest records the overview verifies, and how long its answer is kept.
RECENT_RECORDS = 2000
CHAIN_STATUS_SECONDS = 60.0


def _chain_status(engine: Engine) -> Callable[[], Any]:
    """The overview's audit-chain card: the newest :data:`RECENT_RECORDS` records verified
    (:func:`sts.adapters.audit_integrity.verify_recent`, a fraction of a second), and the summaries
    of those records checked against them (:mod:`sts.adapters.audit_summary_check`), at most once a
    minute per process; the whole trail and checkpoints are ``sts audit verify``'s."""
    from sqlalchemy.exc import SQLAlchemyError

    from ..adapters import audit_integrity
    from ..adapters.audit_summary_check import SummaryCheck
    from ..http.review import ChainStatus

    lock = threading.Lock()
    kept: list[tuple[float, ChainStatus]] = []

    def status() -> ChainStatus:
        now = time.monotonic()
        with lock:
            if kept and now - kept[0][0] < CHAIN_STATUS_SECONDS:
                return kept[0][1]
        try:
            checked, broken = audit_integrity.verify_recent(engine, RECENT_RECORDS)
            summaries = [] if broken else SummaryCheck(engine).check(RECENT_RECORDS)
        except (SQLAlchemyError, ValueError, TypeError, OverflowError) as exc:
            found = ChainStatus("unknown", f"the trail could not be read ({type(exc).__name__})")
        else:
            whole = "run sts audit verify for the whole trail and the checkpoints"
            if broken:
                found = ChainStatus("broken", f"{broken[0]}; {len(broken)} chain(s) broken; {whole}")
            elif summaries:
                # The records verify, but what the charts, the graph and the filters read from
                # them does not say what they say (sts.adapters.audit_summary_check).
                mend = "`sts audit summarize --rebuild` makes them again from the records"
                found = ChainStatus(
                    "broken", f"the summaries disagree with the records: {summaries[0]}; {whole}; {mend}"
                )
            elif checked:
                found = ChainStatus(
                    "verified", f"the newest {checked:,} records, a minute ago at most; {whole}"
                )
            else:
                found = ChainStatus("unknown", "no chained record yet")
        with lock:
            kept[:] = [(now, found)]
        return found

    return status


def _slow(check: Callable[[], bool]) -> bool:
    """A password check gives up the worker's turn (hashlib lets go of the interpreter lock while it
    hashes), so the worker's token requests run meanwhile."""
    with waiting():
        return check()


def check_review_users(settings: Settings) -> None:
    """Refuse a review user's password hash this service cannot check (as the start does, and
    ``sts config check``: it passed one that the start then refused)."""
    for user in settings.review.users:
        if not check_hash_format(user.password_hash):
            raise ConfigurationError(
                f"setting review.users.{user.username}.password_hash: not a recognised hash "
                "(make one with `sts clients secret --stdin`)"
            )
    kinds = {u.password_hash.rsplit("$", 2)[0] for u in settings.review.users}
    if len(kinds) > 1:
        logging.getLogger(__name__).warning(
            "review.users: password hashes of %d kinds or costs (%s): a sign-in with a wrong password "
            "takes less time for a user whose hash is cheaper than the dearest, which tells that the "
            "name is a user's; make them all with `sts clients secret --stdin`",
            len(kinds),
            ", ".join(sorted(kinds)),
        )


def build_review(
    settings: Settings,
    engine: Engine,
    baselines: BaselineStore | None,
    clock: Callable[[], float],
    *,
    redis_client: redis.Redis | None = None,
    ended: RevokedTokens | None = None,
) -> Any:
    """The review page's blueprint (``review.enabled``), given what it reads.  Nothing here
    needs the database: its tables come with the schema's migrations.  Sign-ins are rate-limited
    (:data:`SIGN_IN_LIMITS`) in the shared store, whether or not ``rate_limits`` is enabled; a
    signed-out session is remembered in ``ended`` (the revoked-tokens store)."""
    from ..adapters import audit_query
    from ..http import review

    check_review_users(settings)
    limiter = _sign_in_limiter(settings, engine, redis_client)
    config = review.ReviewConfig(
        users={u.username: u.password_hash for u in settings.review.users},
        session_secret=secret_file(settings.keys_dir / "review-session.secret"),
        session_lifetime=settings.review.session_lifetime,
        secure_cookie=settings.issuer.startswith("https://"),
        new_edge_days=settings.review.new_edge_days,
        issuer_names=tuple(i.name for i in settings.issuers),
        admit_sign_in=functools.partial(limiter.for_sign_in, SIGN_IN),
        ended=ended,
        slow=_slow,
    )
    config = dataclasses.replace(config, chain_status=_chain_status(engine))
    query = audit_query.AuditQuery(engine, clock=clock)
    return review.blueprint(config, query=query, baselines=baselines, clock=clock)


def _sign_in_limiter(settings: Settings, engine: Engine, redis_client: redis.Redis | None) -> RateLimiter:
    limits = settings.rate_limits
    policy = RateLimitPolicy({SIGN_IN: SIGN_IN_LIMITS}, limits.ipv4_prefix, limits.ipv6_prefix)
    return RateLimiter(policy, rate_limit_store(engine, redis_client))
