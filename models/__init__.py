"""Encoders, pretrained weight resolution and classification heads, behind one registry."""
