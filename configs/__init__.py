"""Experiment configs: each module's `get_config()` returns a complete `ml_collections.ConfigDict`."""
