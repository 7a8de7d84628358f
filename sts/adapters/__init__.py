"""Adapters: I/O behind the ports of :mod:`sts.core.ports` (storage, key files, JWKS fetching)."""
