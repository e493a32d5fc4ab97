"""Metrics and reports on held-out cells."""
