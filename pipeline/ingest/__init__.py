"""The ingest and split stages, and the one reader/joiner of manifest x splits."""
