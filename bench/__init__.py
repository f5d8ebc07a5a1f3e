"""acb benchmarks: the workloads of ``shared/benchmarks.md`` in async and sync mode (``python -m bench.run``)."""
