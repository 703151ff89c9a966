"""Retrieval and localization metrics."""
