"""The thin HTTP layer: turn a Flask request into pipeline input, and its result into JSON.

Each blueprint is built by a factory given the services it uses (``sts.app`` wires them);
nothing here imports ``sts.app`` or an adapter (``tests/test_architecture.py``).
"""
