"""The model a replica holds: loading one shared pipeline and its per-request views, the
loaded model's own limits, the speed levers applied at load, the threads that run torch,
and the embedded tiny models built offline."""
