"""`promptflow.contracts`."""
