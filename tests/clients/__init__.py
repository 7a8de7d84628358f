"""Tests of the client library (``clients/python``)."""
