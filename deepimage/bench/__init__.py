"""Benchmarks: `python -m deepimage.bench.loader` (Arrow loader vs PIL folder)."""
