"""Benchmarks (``code/bench.py``, ``scripts/bench.sh``): each figure in its own process, on the demo corpus
and benchmark-sized models built from configs; ``docs/benchmarks.md`` describes every figure."""
