"""Helpers for the tests and benchmarks only (measuring, not training): nothing in the product imports them."""
