"""``sts audit verify`` and ``sts audit checkpoint``: the audit trail's hash chains."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import click

from ..core.terminal_text import printable
from ..errors import ConfigurationError
from ..settings import Settings
from .context import settings_from
from .database import open_database
from .keys import open_keyring


def _audit_engine(settings: Settings) -> Any:
    from sqlalchemy.exc import SQLAlchemyError

    from ..migrations import SchemaError, ensure

    engine = open_database(settings)
    try:
        ensure(engine, migrate=settings.database_migrate_on_start)
    except (SchemaError, ConfigurationError) as exc:
        raise click.ClickException(f"setting database_url: {exc}") from None
    except SQLAlchemyError as exc:
        raise click.ClickException(
            f"setting database_url: cannot open the audit trail ({type(exc).__name__})"
        ) from None
    return engine


@click.command("verify")
@click.option(
    "--checkpoint",
    "checkpoint_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A checkpoint from `sts audit checkpoint`: every chain must still reach the head it saw "
    "(repeatable).",
)
@click.option(
    "--jwks",
    "jwks_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Check checkpoint signatures with this JWK Set (default: the keys the key ring publishes).",
)
@click.option(
    "--allow-unchained",
    is_flag=True,
    help="Accept records without a chain written after chaining began (by an older version).",
)
@click.pass_context
def audit_verify(
    ctx: click.Context, checkpoint_files: tuple[Path, ...], jwks_file: Path | None, allow_unchained: bool
) -> None:
    """Recompute the audit trail's hash chains; report the first broken link of each chain.

    Exits 0 when every record is as it was written, 1 when a record was changed,
    deleted or moved, or (with --checkpoint) the newest records were deleted.
    Whoever changed the trail also chose what its columns hold: every value read from
    it is printed escaped (sts.core.terminal_text), since a terminal control sequence
    in a chain id erased the BROKEN lines and printed a fake verdict (an outside audit).
    """
    from sqlalchemy.exc import SQLAlchemyError

    from ..adapters import audit_integrity
    from ..adapters.audit_summary_check import SummaryCheck
    from ..core.audit_chain import AuditTrailBroken
    from ..core.audit_checkpoint import CheckpointInvalid

    settings = settings_from(ctx)
    checkpoints = []
    if checkpoint_files:
        key_for = _checkpoint_keys(settings, jwks_file)
        for path in checkpoint_files:
            try:
                checkpoint = audit_integrity.read_checkpoint(path.read_text(), key_for, settings.issuer)
            except (CheckpointInvalid, OSError, UnicodeError, RecursionError) as exc:
                raise click.ClickException(f"{path}: not a valid checkpoint: {exc}") from None
            checkpoints.append((path, checkpoint))
    engine = _audit_engine(settings)
    try:
        report, unchained = audit_integrity.verify_trail(engine, [c for _, c in checkpoints])
        summaries = SummaryCheck(engine).check()
    except AuditTrailBroken as exc:
        for link in exc.report.broken:
            click.echo(f"BROKEN {link}")
        click.echo(f"audit trail does NOT verify: {len(exc.report.broken)} broken chain(s)")
        ctx.exit(1)
    except SQLAlchemyError as exc:
        raise click.ClickException(
            f"setting database_url: cannot read the audit trail ({type(exc).__name__})"
        ) from None
    except (ValueError, TypeError, OverflowError) as exc:
        # A column holding what no writer stores (text in a number column, a time that is no
        # time: SQLite takes anything): edited.  Said as a failed verification, not a traceback.
        click.echo(
            f"BROKEN a stored value cannot be read as its column's type (edited): {printable(exc)}"[:300]
        )
        click.echo("audit trail does NOT verify")
        ctx.exit(1)
    finally:
        engine.dispose()
    click.echo(f"ok: {report.records} record(s) in {len(report.heads)} chain(s) verify")
    failed = False
    if unchained.after:
        # Said before the summaries: a made-up record shows in both (an outside audit).
        click.echo(
            f"{'note' if allow_unchained else 'BROKEN'}: {unchained.after} record(s) without a chain "
            f"written after chaining began (first: record id {unchained.first_after}); not by this version"
        )
        failed = not allow_unchained
    if summaries:
        # The records verify; what the review page and `sts audit query` read from them does not.
        for problem in summaries:
            click.echo(f"BROKEN summaries: {printable(problem)}")
        click.echo(
            "audit summaries do NOT agree with the records (the review page's charts, graph and "
            "signal/audience filters read them): `sts audit summarize --rebuild` makes them again"
        )
        failed = True
    if failed:
        ctx.exit(1)
    for path, checkpoint in checkpoints:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(checkpoint.issued_at or 0))
        click.echo(f"ok: every chain reaches the head checkpoint {path} saw ({when}, key {checkpoint.kid})")
    if report.pruned_past_checkpoint:
        pruned = len(set(report.pruned_past_checkpoint))
        click.echo(f"note: {pruned} chain(s) pruned past a checkpoint's head (not checkable there)")
    if unchained.before:
        click.echo(f"note: {unchained.before} record(s) written before chaining began are not covered")


def _checkpoint_keys(settings: Settings, jwks_file: Path | None) -> Any:
    """``key_for(kid, alg)`` over the JWK Set given, else over what the key ring publishes.

    A ``--jwks`` file that cannot be read as JSON is one line naming it: nested deeper than
    Python's stack it ended in a ``RecursionError`` traceback, and text that is not JSON in
    "Error: Expecting value" naming no file (an outside audit)."""
    from ..adapters.jwks import StaticJWKS
    from ..adapters.signing_keys import SUPPORTED_ALGORITHMS

    try:
        if jwks_file is not None:
            document, source = _jwks_document(jwks_file), str(jwks_file)
        else:
            document, source = open_keyring(settings, create=False).public_jwks(), "the key ring"
        return StaticJWKS(document, algorithms=list(SUPPORTED_ALGORITHMS), source=source).key_for
    except (ConfigurationError, OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


def _jwks_document(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise click.ClickException(f"--jwks {path}: cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise click.ClickException(f"--jwks {path}: not UTF-8") from None
    except RecursionError:
        raise click.ClickException(f"--jwks {path}: not a usable JWK Set (JSON nested too deep)") from None
    except ValueError as exc:
        raise click.ClickException(f"--jwks {path}: not JSON ({exc})") from None


def _new_checkpoint_file(path: Path) -> Any:
    """A new file, ``0644`` at most whatever the umask: a checkpoint is no secret, but one that
    others may write can be swapped for an older one, still validly signed, that no longer shows
    a truncation (an outside audit found it ``0666`` under umask 000).  Never an existing file
    (``O_EXCL``), nor through a symbolic link (``O_NOFOLLOW``), as ``sts audit export -o``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.fdopen(os.open(path, flags, 0o644), "w", encoding="ascii")
    except FileExistsError:
        raise click.ClickException(f"{path}: already exists (never overwritten)") from None
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot be created ({exc.strerror})") from None


@click.command("checkpoint")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the checkpoint to this new file (default: standard output).",
)
@click.pass_context
def audit_checkpoint(ctx: click.Context, output: Path | None) -> None:
    """Sign every audit chain's head with the service's signing key: a JWS to keep elsewhere.

    `sts audit verify --checkpoint FILE` then detects the deletion of any record
    the checkpoint covers, the newest ones included, but for an oldest run of the
    whole trail, which is what a prune removes (docs/audit.md, Checkpoints).
    """
    from sqlalchemy.exc import SQLAlchemyError

    from ..adapters import audit_integrity

    settings = settings_from(ctx)
    signer = open_keyring(settings, create=False).signer()
    engine = _audit_engine(settings)
    try:
        token, chains = audit_integrity.sign_checkpoint(engine, signer, settings.issuer, time.time())
    except SQLAlchemyError as exc:
        raise click.ClickException(
            f"setting database_url: cannot read the audit trail ({type(exc).__name__})"
        ) from None
    finally:
        engine.dispose()
    if output is None:
        click.echo(token)
    else:
        try:
            with _new_checkpoint_file(output) as out:
                out.write(token + "\n")
        except OSError as exc:
            raise click.ClickException(f"{output}: {exc.strerror}") from None
    click.echo(f"checkpoint of {chains} chain(s) signed with key {signer.kid}", err=True)
