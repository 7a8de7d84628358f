"""The settings every command reads: ``--config`` (kept on the click context), then
``STS_CONFIG`` or ``./sts.yaml``, then ``STS_*`` variables; invalid ones end the command
with a clear message."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import click

from ..errors import ConfigurationError
from ..settings import Settings
from ..settings.load import load_settings


def settings_from(ctx: click.Context, **overrides: Any) -> Settings:
    """The settings, with the command's options that were given (not None) overriding them.  A
    setting refused that an option gave is said of the option (``option --port: setting port:
    ...``), not of the config file or "settings", whose value it replaced (an outside audit)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return load_settings(ctx.obj.get("config"), overrides=given)
    except ConfigurationError as exc:
        raise click.ClickException(_naming_the_option(str(exc), given)) from None


def _naming_the_option(message: str, given: Mapping[str, Any]) -> str:
    """``message`` from the first ``setting <name>:`` (or ``<name>.``) of an option given, said of it."""
    for name in given:
        found = re.search(rf"setting {re.escape(name)}[:.]", message)
        if found:
            return f"option --{name.replace('_', '-')}: {message[found.start() :]}"
    return message
