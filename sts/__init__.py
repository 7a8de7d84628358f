"""Workload token-exchange broker: an OAuth 2.0 Security Token Service (RFC 8693)."""

__version__ = "0.1.0"
