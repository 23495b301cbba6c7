"""Benchmarks of the served app over HTTP on 127.0.0.1, and the peers it is compared with."""
