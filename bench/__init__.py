"""Benchmarks of autoregembed_fast against the anchors: `python -m bench`."""
