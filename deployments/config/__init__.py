"""The builder's `args:` as typed, strict models, shared by both sides (validated once, when
the application is built; every field has a default or is required, and a description).

- `app_config.py`: the whole `args:`: models, limits, storage, batching, auth, CORS;
- `model_config.py`: one model's args: source, request defaults, batching, Serve options;
- `optimizations_config.py`: a model's speed levers: compile, cache, attention, quantization;
- `quota_config.py`: per-key quotas and the Redis they count in;
- `base.py`: the strict base every config model shares, and the default cache directory.
"""
