"""Models: resolving and checking a model, loading it for a task, meta-device builds,
target matching, adapter injection, adapter state in and out, accounting, merging and
safetensors shards. `build.py` turns a recipe (or a saved run) into a model with its adapter."""
