"""Tests of ``sts/core/profiles``: one file per attestation profile (see conftest.py)."""
