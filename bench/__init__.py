"""Benchmarks (not tests): `make bench` runs them all; each module also runs alone."""
