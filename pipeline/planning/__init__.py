"""Planning: a dataset fingerprint and the recipes derived from it (``medxfer plan``)."""
