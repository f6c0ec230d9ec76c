"""Benchmarks run by `make bench`: ingest, the database path, the sweep and memory."""
