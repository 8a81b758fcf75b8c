"""Benchmark suite of Waddle realtime against its peers.

``python -m bench`` (``make bench``) starts each system under test as its own
processes, drives it from a separate load-generator process (uvloop and
picows) and writes JSON, a Markdown table and PNG plots under
``bench/results/``. See ``docs/performance.md`` for the scenarios, the
latest results and how to reproduce them.
"""
