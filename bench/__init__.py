"""Benchmarks (never timed tests). Run each from the repository root as a module, e.g.
``python -m bench.loadgen --help``; the ones that start the service take the tiny network and the
server launcher from ``tests/service_helpers.py``, as the tests do. BENCHMARKS.md has the results."""
