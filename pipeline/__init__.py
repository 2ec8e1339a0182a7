"""medxfer pipeline: stages, CLI, data, training and tracking."""

__version__ = "0.1.0"
