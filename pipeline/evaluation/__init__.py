"""The evaluate stage and the model card."""
