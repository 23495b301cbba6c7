"""Output safety on the generator replica: the model's image checker (`image_checker.py`,
loaded from `models[].safety`), the embedded tiny one for tests (`tiny_checker.py`), and the
gate every finished image and every preview passes before it leaves the replica
(`safety_gate.py`)."""
