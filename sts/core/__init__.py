"""The pure decision pipeline.

Nothing here imports a web framework, a database client or a cache client;
storage and network access go through the protocols in :mod:`sts.core.ports`.
"""
