"""Benchmark sections: each module exposes ``run(ctx) -> list[Metric]``; its docstring describes it."""
