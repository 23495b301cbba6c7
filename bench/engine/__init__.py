"""Benchmarks in-process on the pipeline and the engine's pieces, no server."""
