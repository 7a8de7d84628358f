"""Wire formats only: parse and serialise, decide nothing."""
