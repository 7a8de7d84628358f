"""The review page (``review.enabled``): its blueprint, given what it reads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine

from ..core.client_secrets import check_hash_format
from ..core.ports import BaselineStore
from ..errors import ConfigurationError
from ..settings import Settings
from .secret_files import secret_file


def build_review(
    settings: Settings, engine: Engine, baselines: BaselineStore | None, clock: Callable[[], float]
) -> Any:
    """The review page's blueprint (``review.enabled``), given what it reads.  Nothing here
    needs the database: its tables come with the schema's migrations."""
    from ..adapters import audit_query
    from ..http import review

    for user in settings.review.users:
        if not check_hash_format(user.password_hash):
            raise ConfigurationError(
                f"setting review.users.{user.username}.password_hash: not a recognised hash "
                "(make one with `sts clients secret --stdin`)"
            )
    config = review.ReviewConfig(
        users={u.username: u.password_hash for u in settings.review.users},
        session_secret=secret_file(settings.keys_dir / "review-session.secret"),
        session_lifetime=settings.review.session_lifetime,
        secure_cookie=settings.issuer.startswith("https://"),
        new_edge_days=settings.review.new_edge_days,
    )
    query = audit_query.AuditQuery(engine, clock=clock)
    return review.blueprint(config, query=query, baselines=baselines, clock=clock)
