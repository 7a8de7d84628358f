"""The ``sts`` command: serve, config, keys, policy, clients, audit, db, dev, revoke, baseline.

Every command reads the same settings (``--config`` / ``STS_CONFIG`` /
``./sts.yaml``, then ``STS_*`` variables; :mod:`.context`) and exits non-zero
with a clear message when they are invalid.  Each command group is a module
of this package; :func:`main` (the ``sts`` console script) assembles them.
"""

from __future__ import annotations

from pathlib import Path

import click

from . import audit, baseline, clients, config, db, dev, keys, policy, revoke, serve


@click.group()
@click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Configuration file (default: $STS_CONFIG, else ./sts.yaml when present).",
)
@click.pass_context
def main(ctx: click.Context, config: Path | None) -> None:
    """Workload token-exchange broker (OAuth 2.0 Token Exchange, RFC 8693)."""
    ctx.ensure_object(dict)
    ctx.obj["config"] = config


main.add_command(serve.serve)
main.add_command(config.config)
main.add_command(keys.keys)
main.add_command(policy.policy)
main.add_command(clients.clients)
main.add_command(audit.audit)
main.add_command(db.db)
main.add_command(dev.dev)
main.add_command(revoke.revoke)
main.add_command(baseline.baseline)
