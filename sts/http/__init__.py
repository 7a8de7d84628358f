"""The thin HTTP layer: turn a Flask request into pipeline input, and its result into JSON."""
