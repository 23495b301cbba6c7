"""The continuous loop: text-to-image jobs of flow-matching families join a running
denoising loop at its next step and leave when their own steps are done. Read
`continuous_batching.py` (which jobs, which lane), then `denoise_loop.py` (a lane's loop),
`families/` (one step over rows with their own steps and guidance, a module per family),
`loop_jobs.py` and `loop_adapters.py`."""
