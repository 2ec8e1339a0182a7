"""Foundations every layer may use: the error family, console UI, workspace paths, JSON helpers."""
