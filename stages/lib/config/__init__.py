"""Configuration: the typed schema of params.yaml, loading and validating it."""
