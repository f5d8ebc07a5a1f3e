"""acb benchmarks: the workloads of ``docs/workloads.md`` in async and sync mode (``python -m bench.run``)."""
