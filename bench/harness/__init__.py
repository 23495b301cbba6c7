"""What the benchmarks share: the app run as a user runs it, the load driver, the outputs."""
