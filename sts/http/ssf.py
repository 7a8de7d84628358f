"""Shared Signals receiver (RFC 8935 push delivery of RFC 8417 Security Event Tokens). Stub."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Flask

if TYPE_CHECKING:
    from ..app import Runtime


def install(app: Flask, runtime: Runtime) -> None:
    """Register the receiver's endpoint when transmitters are configured."""
    return None
