"""The generic benchmark harness: timing, memory, FLOPs, results, reports and the CLI."""
