"""Thin routes, one module per endpoint family."""
