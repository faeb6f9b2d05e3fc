"""Benchmarks of the `llama` package against its peers: `python -m benchmarks.bench`."""
