"""Builders of offline inputs (python -m dev.offline_data)."""
