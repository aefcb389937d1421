"""Benchmarks of the gateway, run by ``scripts/bench`` and ``scripts/bench-clients``.

``python -m bench`` measures the gateway next to its upstream and nginx
(:mod:`bench.cli`); ``python -m bench.clients`` measures minimal proxies that
differ only in their upstream HTTP client. Processes are started with the
helpers the tests use (``tests/processes.py``).
"""

from __future__ import annotations


class BenchError(Exception):
    """Something the benchmark needs did not work; the message says what."""
