"""Tests of ``sts/protocol``: the wire formats (RFC 8693 requests, client authentication)."""
