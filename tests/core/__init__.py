"""Tests of ``sts/core``: the decision pipeline (attestation, claims, policy, risk, delegation...)."""
