"""The settings every command reads: ``--config`` (kept on the click context), then
``STS_CONFIG`` or ``./sts.yaml``, then ``STS_*`` variables; invalid ones end the command
with a clear message."""

from __future__ import annotations

from typing import Any

import click

from ..errors import ConfigurationError
from ..settings import Settings
from ..settings.load import load_settings


def settings_from(ctx: click.Context, **overrides: Any) -> Settings:
    """The settings, with the command's options that were given (not None) overriding them."""
    try:
        return load_settings(
            ctx.obj.get("config"), overrides={k: v for k, v in overrides.items() if v is not None}
        )
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None
