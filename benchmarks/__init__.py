"""Benchmarks: medxfer against what a user would write instead, measured side by side in one run.

Run with ``make bench`` (``python -m benchmarks.run_all``); never part of ``make test``.
"""
