"""Braid benchmarks: ``python -m bench [--section NAME] [--quick]`` (see bench.framework)."""
