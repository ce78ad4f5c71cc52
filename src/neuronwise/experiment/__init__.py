"""Experiment layer: config schema, trainer, run directories, reports and the CLI (uses only the public library API)."""
