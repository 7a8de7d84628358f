"""Tests of ``sts/adapters``: stores, key ring, JWKS fetching, audit trail, metrics, logs and traces."""
