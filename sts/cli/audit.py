"""``sts audit``: the audit trail (tail, query, export, prune, summarize; verify and checkpoint)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from ..core.audit_filter import MAX_RECORD_ID
from ..core.terminal_text import printable
from ..errors import ConfigurationError
from .audit_integrity import audit_checkpoint, audit_verify
from .context import settings_from
from .database import open_database


@click.group()
def audit() -> None:
    """The audit trail."""


audit.add_command(audit_verify)
audit.add_command(audit_checkpoint)


@audit.command("tail")
@click.option("-n", "limit", default=20, show_default=True, type=click.IntRange(1, 10000))
@click.option("--outcome", type=click.Choice(["granted", "refused", "error"]), default=None)
@click.option("--subject", default=None)
@click.pass_context
def audit_tail(ctx: click.Context, limit: int, outcome: str | None, subject: str | None) -> None:
    """Print the newest decisions as JSON lines, newest first."""
    from sqlalchemy.exc import SQLAlchemyError

    from ..adapters.sql.audit_sink import SqlAuditSink
    from ..migrations import SchemaError, ensure

    settings = settings_from(ctx)
    filters = {k: v for k, v in _text_options({"outcome": outcome, "subject": subject}).items() if v}
    engine = open_database(settings)
    try:
        ensure(engine, migrate=settings.database_migrate_on_start)
        records = SqlAuditSink(engine).recent(limit, **filters)
    except (SchemaError, ConfigurationError) as exc:
        raise click.ClickException(f"setting database_url: {exc}") from None
    except SQLAlchemyError as exc:
        raise click.ClickException(
            f"setting database_url: cannot read the audit trail ({type(exc).__name__})"
        ) from None
    for record in records:
        click.echo(json.dumps(record, sort_keys=True))


def _audit_filter_options(command: Any) -> Any:
    """The filter every ``sts audit`` query shares with the review page (sts.core.audit_filter)."""
    options = [
        click.option("--issuer", help="Upstream issuer name (with --subject: one identity)."),
        click.option("--subject", help="Subject (the token's sub)."),
        click.option("--client", "client_id", help="Client id."),
        click.option("--audience", help="A requested or granted audience (or resource)."),
        click.option("--outcome", type=click.Choice(["granted", "refused", "error"])),
        click.option("--signal", help="A risk signal that fired, e.g. attestation_drift."),
        click.option("--rule", help="Policy rule name."),
        click.option("--error", help="OAuth error code, e.g. insufficient_user_authentication (step-ups)."),
        click.option("--since", help="ISO-8601 time, or an age: 90m, 24h, 7d, 2w."),
        click.option("--until", help="ISO-8601 time, or an age (exclusive)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _text_options(values: dict[str, Any]) -> dict[str, str]:
    """The options given as text; one that is not UTF-8 (bytes a shell passed through, which Python
    holds as surrogates) is a usage error, not a traceback when the database is asked for it."""
    params = {k: v for k, v in values.items() if isinstance(v, str)}
    for name, value in params.items():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise click.UsageError(f"--{name.removesuffix('_id')} is not valid UTF-8") from None
    return params


def _audit_filter(values: dict[str, Any]) -> Any:
    from ..core.audit_filter import FilterError, filter_from_params

    params = _text_options(values)
    try:
        return filter_from_params(params, time.time())
    except FilterError as exc:
        raise click.UsageError(str(exc)) from None


def _audit_query(ctx: click.Context) -> Any:
    from ..adapters import audit_query
    from ..migrations import SchemaError, ensure

    settings = settings_from(ctx)
    engine = open_database(settings)
    try:
        ensure(engine, migrate=settings.database_migrate_on_start)
    except (SchemaError, ConfigurationError) as exc:
        raise click.ClickException(f"setting database_url: {exc}") from None
    return audit_query.AuditQuery(engine)


def _audit_failed(exc: Exception) -> click.ClickException:
    return click.ClickException(f"setting database_url: cannot read the audit trail ({type(exc).__name__})")


@audit.command("query")
@_audit_filter_options
@click.option("-n", "limit", default=50, show_default=True, type=click.IntRange(1, 1000))
@click.option("--before", type=click.IntRange(1, MAX_RECORD_ID), default=None,
              help="Only records with an id below this (the next page).")  # fmt: skip
@click.pass_context
def audit_query_cmd(ctx: click.Context, /, limit: int, before: int | None, **filters: Any) -> None:
    """Decisions matching the filters, newest first, as JSON lines (with their "id").

    Pages by id: when more match, the command to show them is printed on stderr.
    """
    from sqlalchemy.exc import SQLAlchemyError

    wanted = _audit_filter(filters)
    try:
        query = _audit_query(ctx)
        if wanted.signal or wanted.audience:
            query.refresh(budget=5.0)
        page = query.page(wanted, limit=limit, before=before)
    except SQLAlchemyError as exc:
        raise _audit_failed(exc) from None
    for row in page.rows:
        click.echo(json.dumps(row, sort_keys=True, default=str))
    if page.older is not None:
        click.echo(f"more: add --before {page.older}", err=True)


@audit.command("export")
@_audit_filter_options
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A new file to write (default: stdout).")  # fmt: skip
@click.pass_context
def audit_export(ctx: click.Context, /, output: Path | None, **filters: Any) -> None:
    """Stream decisions matching the filters, oldest first, as JSON lines for a SIEM.

    One object per line: the audit record plus its "id".  Read in batches by id, so
    memory stays constant however many records match.
    """
    from sqlalchemy.exc import SQLAlchemyError

    wanted = _audit_filter(filters)
    try:
        query = _audit_query(ctx)
        if wanted.signal or wanted.audience:
            query.refresh(budget=5.0)
        out = sys.stdout if output is None else _new_file(output)
        count = 0
        try:
            for row in query.export(wanted):
                out.write(json.dumps(row, sort_keys=True, default=str) + "\n")
                count += 1
        finally:
            if output is not None:
                out.close()
    except SQLAlchemyError as exc:
        raise _audit_failed(exc) from None
    if output is not None:
        click.echo(f"exported {count} record(s) to {output}", err=True)


def _new_file(path: Path) -> Any:
    import os

    try:
        return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8")
    except FileExistsError:
        raise click.ClickException(f"{path}: already exists (never overwritten)") from None
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot be created ({exc.strerror})") from None


@audit.command("prune")
@click.option("--older-than", "days", type=click.IntRange(1, 36500), required=True,
              help="Remove records older than this many days (1 to 36500).")  # fmt: skip
@click.option("--archive", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write them to this new file (JSON lines, fsynced) before deleting.")  # fmt: skip
@click.option("--delete", "delete_only", is_flag=True, help="Delete without an archive.")
@click.option("--dry-run", is_flag=True, help="Only count what would be removed.")
@click.pass_context
def audit_prune(
    ctx: click.Context, days: int, archive: Path | None, delete_only: bool, dry_run: bool
) -> None:
    """Retention: archive (or delete) records older than N days, oldest first.

    What goes is always a contiguous oldest run of records (by id), so what remains
    can still be verified from its first record on.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from ..adapters.audit_retention import PruneAborted
    from ..adapters.sql.retention import PruneWouldBreakChain
    from ..core.audit_filter import format_time

    if (archive is not None and delete_only) or (not dry_run and archive is None and not delete_only):
        raise click.UsageError("give exactly one of --archive FILE or --delete")
    if archive is not None and archive.exists():
        raise click.ClickException(f"{archive}: already exists (never overwritten)")
    cutoff = time.time() - days * 86400
    try:
        result = _audit_query(ctx).prune(cutoff=cutoff, archive=None if dry_run else archive, dry_run=dry_run)
    except SQLAlchemyError as exc:
        raise _audit_failed(exc) from None
    except OSError as exc:
        raise click.ClickException(f"{archive}: not written ({exc.strerror}); nothing deleted") from None
    except PruneAborted as exc:
        raise click.ClickException(f"the trail changed while archiving ({exc}); nothing deleted") from None
    except PruneWouldBreakChain as exc:
        # It names a chain id read from the database: escaped (sts.core.terminal_text).
        raise click.ClickException(f"{printable(exc)}; nothing deleted") from None
    older = f"{result.records} record(s) older than {format_time(cutoff)}"
    if dry_run:
        click.echo(f"would remove {older} (ids below {result.boundary_id})")
    elif result.archive is not None:
        click.echo(f"archived {older} to {result.archive}, then deleted them")
    else:
        click.echo(f"deleted {older}")


@audit.command("summarize")
@click.option(
    "--rebuild",
    is_flag=True,
    help="Delete the summaries and make them again from the records (after `sts audit verify` "
    "found them disagreeing with the records).",
)
@click.option(
    "--follow",
    is_flag=True,
    help="Then keep them up to date, at the lowest CPU priority, until SIGTERM: what `sts serve` "
    "runs with the review page enabled.",
)
@click.option(
    "--behind",
    type=click.IntRange(1),
    default=10_000,
    show_default=True,
    help="With --follow: catch up when this many records wait.",
)
@click.option(
    "--interval",
    type=click.FloatRange(0.1),
    default=5.0,
    show_default=True,
    help="With --follow: seconds between looks.",
)
@click.option("--parent", type=int, default=None, hidden=True, help="With --follow: end with this process.")
@click.pass_context
def audit_summarize(
    ctx: click.Context, rebuild: bool, follow: bool, behind: int, interval: float, parent: int | None
) -> None:
    """Bring the summaries behind signal and audience filters, charts and the graph up to date.

    The review page and the queries do this a little at a time; run it once after an
    upgrade on a large trail (thousands of records a second), or from cron. With --rebuild,
    from the records alone: what pruned records had added to the graph and the charts is gone.
    """
    from sqlalchemy.exc import SQLAlchemyError

    if parent is not None:
        from ..adapters.worker_process import die_with_parent

        die_with_parent(parent)
    if follow:
        os.nice(19)  # the first catch-up too: the CPU requests leave, never theirs
    try:
        query = _audit_query(ctx)
        if rebuild:
            query.forget_summaries()
        status = query.refresh(budget=None)
    except SQLAlchemyError as exc:
        raise _audit_failed(exc) from None
    if follow:
        _follow(ctx, query, behind=behind, interval=interval)
        return
    click.echo(f"summaries up to record {status.last_id} ({status.behind} newer record(s) not yet settled)")


def _follow(ctx: click.Context, query: Any, *, behind: int, interval: float) -> None:
    """``--follow``: until SIGTERM or SIGINT (see :mod:`sts.adapters.summary_follower`)."""
    import signal
    import threading

    from ..adapters.log_format import configure_logging
    from ..adapters.summary_follower import follow

    settings = settings_from(ctx)
    configure_logging(settings.log_level, settings.log_format)

    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.set())
    click.echo("sts: keeping the audit summaries up to date", err=True)
    follow(query, stop, behind=behind, interval=interval)
