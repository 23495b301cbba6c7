"""The model side: one Serve deployment per model (`deployment.py`), whose engine
(`engine.py`) admits a job and routes it to request-level calls (`calls/`) or the continuous
loop (`loop/`), over the model its replica holds (`model/`), with LoRA adapters
(`adapters/`) and what it reports (`progress/`). Never imports `deployments.ingress`."""
