"""A request's validation, one module a concern; `request_validation.py` runs them in order
(text that is not text, the schema against the config's and the model's limits, what the
model's pipeline takes)."""
