"""LoRA adapters on a replica: fetched and checked (`adapter_store.py`, `adapter_fit.py`),
kept apart from calls with other adapter sets (`adapter_gate.py`), chosen per row within one
forward in the loop (`mixed_lora.py`), and the embedded tiny adapters built offline."""
