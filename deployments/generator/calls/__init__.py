"""The request-level path: compatible jobs grouped into batches (`batching.py`), each batch
run as pipeline calls on per-call views (`call_runner.py`), with the calls' arguments, plan
and timing in their own modules, and the warm-up calls before a replica is ready."""
