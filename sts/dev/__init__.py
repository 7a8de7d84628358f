"""Development-only tools.  NEVER trust anything in this package in production.

:mod:`sts.dev.issuer` is a fake upstream token issuer that plays GitHub Actions,
Kubernetes, GitLab CI and SPIFFE for the README quickstart and the test suite:
it mints realistic workload tokens with a throw-away key and serves that key
as a real JWKS over HTTP.  Anyone who can reach it can mint any identity, so
an STS configured to trust it trusts everyone.
"""
