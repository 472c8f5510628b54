"""Consumers of stores and training logs: scale reports, convergence diagnostics, plots."""
