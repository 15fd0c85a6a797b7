"""Where models live: fetch a registered version to audit, and write the verdict back (MLflow)."""
