"""Benchmarks runnable on CPU with tiny settings (``python -m benchmarks.<name> --help``)."""
