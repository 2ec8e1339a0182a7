"""Encoders, pretrained weight resolution and classification heads, behind one registry (timm's layout).

Importing the package imports the encoder modules, so they register; `medxfer.models.registry` itself
imports none of them.
"""

from medxfer.models import encoders_2d, encoders_3d  # noqa: F401  (register on import)
from medxfer.models.factory import build_encoder, create_classifier
from medxfer.models.registry import DEFAULT_ENCODERS, default_encoder, get_entry, list_encoders

__all__ = ["DEFAULT_ENCODERS", "build_encoder", "create_classifier", "default_encoder", "get_entry", "list_encoders"]
