"""Thin shared helpers for the onefile-ssl method scripts (one module, one job)."""
