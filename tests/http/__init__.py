"""Tests of ``sts/http``: the Flask blueprints, the routes' documentation, what a request carries."""
