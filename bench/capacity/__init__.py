"""Capacity planning: a discrete-event simulation of the service under Serve's autoscaler,
validated against a real local cluster, and extrapolated to GPUs with published figures.

    python -m bench.capacity              # the stored validation table and the extrapolation
    python -m bench.capacity measure      # service times of the embedded model on this CPU
    python -m bench.capacity validate     # real cluster vs simulation (minutes)
"""
