"""Benchmarks for `mirror`: ``python -m bench --help``.

Not part of the test suite.  Results go to ``bench/results/`` (gitignored)
as one JSON file per run, so runs can be compared.
"""
