"""MLflow tracking: one run per stage, started early in a sidecar process."""
