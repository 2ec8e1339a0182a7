"""Metrics, bootstrap CIs, calibration and plots (the only matplotlib importer)."""
