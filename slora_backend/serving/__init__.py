"""Serving path: the engine core process and the stub-side client of it."""
