"""The encoder table, in the spirit of timm's registry: a decorator, the entries and lookups, no encoder.

    @register_encoder("name", spatial_dims=2, weights=(PackageWeights(...), HubWeights(...)))
    def build(in_chans=1, **kw) -> Encoder: ...

An encoder declares its spatial dims, where its pretrained weights can come from (file > package > hub,
see medxfer.models.weights) and what it was pretrained on. This module imports no encoder: the encoder
modules import its decorator, and `medxfer.models` imports them, so the table is full as soon as anything
under `medxfer.models` is imported. Building is medxfer.models.factory; `medxfer models` is
medxfer.models.catalog.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from medxfer.core.errors import MedxferError

# Per-dims defaults when a recipe names no encoder; both load offline from an installed package.
DEFAULT_ENCODERS = {2: "efficientnet_lite0", 3: "efficientnet_lite0_i3d"}
TRANSFER_NOTE = (
    "default I3D inflation (efficientnet_lite0_i3d): a volume of one repeated image gives exactly the 2D "
    "network's output, so the ImageNet function is intact when fine-tuning starts; ACS convolutions "
    "(efficientnet_lite0_acs, resnet18_acs) keep the 2D parameters as they are but not that behaviour"
)


@dataclass(frozen=True)
class EncoderEntry:
    name: str
    spatial_dims: int
    build: Callable[..., Any]
    weights: tuple[Any, ...]
    pretraining: str
    description: str


_REGISTRY: dict[str, EncoderEntry] = {}


def register_encoder(
    name: str, *, spatial_dims: int, weights: tuple[Any, ...] = (), pretraining: str = "", description: str = ""
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register `fn(in_chans=1, **kw) -> Encoder` under `name`."""
    if spatial_dims not in (2, 3):
        raise ValueError("spatial_dims must be 2 or 3")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} is registered twice")
        _REGISTRY[name] = EncoderEntry(name, spatial_dims, fn, tuple(weights), pretraining, description)
        return fn

    return deco


def list_encoders(spatial_dims: int | None = None) -> list[str]:
    """Registered names in registration order, optionally only those of `spatial_dims`."""
    return [n for n, e in _REGISTRY.items() if spatial_dims is None or e.spatial_dims == spatial_dims]


def encoder_entries() -> list[EncoderEntry]:
    return list(_REGISTRY.values())


def get_entry(name: str) -> EncoderEntry:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise MedxferError(f"unknown encoder {name!r}.{hint} Known: {', '.join(_REGISTRY)} (see `medxfer models`)")
    return _REGISTRY[name]


def default_encoder(spatial_dims: int) -> str:
    return DEFAULT_ENCODERS[spatial_dims]
