"""Readers and writers of medical files (the only pydicom and nibabel importers) and the PHI pseudonymiser."""
