"""The test suite: one directory per layer of ``sts/`` (see README, "Tests")."""
