"""Build what the registry names: `create_classifier` (timm's create_model) and `build_encoder`.

    model = create_classifier("efficientnet_lite0", num_classes=2)

`create_classifier` builds the encoder, resolves and loads its weights (file > package > hub, see
medxfer.models.weights) and puts a linear head on top; the model's `weight_report` says what was loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medxfer.core.errors import MedxferError
from medxfer.models.classifier import Classifier
from medxfer.models.heads import head_matches
from medxfer.models.registry import EncoderEntry, get_entry, list_encoders
from medxfer.models.weights import WeightReport, load_encoder_weights, resolve_weights


def check_dims(entry: EncoderEntry, spatial_dims: int | None) -> None:
    """Fail with the encoders that would fit when `entry` does not match the data's dims."""
    if spatial_dims is not None and spatial_dims != entry.spatial_dims:
        others = ", ".join(list_encoders(spatial_dims))
        raise MedxferError(
            f"encoder {entry.name!r} is {entry.spatial_dims}D but the data is {spatial_dims}D; "
            f"choose a {spatial_dims}D encoder: {others}"
        )


def build_encoder(name: str, in_chans: int = 1, spatial_dims: int | None = None, **kw: Any) -> Any:
    """The encoder alone, randomly initialised."""
    entry = get_entry(name)
    check_dims(entry, spatial_dims)
    if in_chans < 1:
        raise MedxferError("in_chans must be at least 1")
    try:
        encoder = entry.build(in_chans=in_chans, **kw)
    except TypeError as exc:
        raise MedxferError(f"encoder {name!r} does not take these options ({exc})") from None
    encoder.registry_name = name
    return encoder


def create_classifier(
    name: str,
    num_classes: int,
    in_chans: int = 1,
    spatial_dims: int | None = None,
    weights: str | Path | None = "default",
    pretrained_head: bool = False,
    drop_rate: float = 0.0,
    **kw: Any,
) -> Classifier:
    """Build encoder `name` with pretrained weights and a fresh `num_classes` linear head.

    weights: "default" (package, then hub), "package", "hub", None/"none" (random init),
    or a local file. pretrained_head keeps the source's classifier when its shape
    matches num_classes (e.g. the 1000 ImageNet classes); otherwise the head is new.
    Extra keyword arguments go to the encoder (e.g. shortcut_type for MedicalNet).
    """
    entry = get_entry(name)
    check_dims(entry, spatial_dims)
    resolved = resolve_weights(name, entry.weights, weights)  # first: an offline hub-only choice fails at once
    encoder = build_encoder(name, in_chans=in_chans, spatial_dims=spatial_dims, **kw)
    model = Classifier(encoder, num_classes, encoder_name=name, drop_rate=drop_rate)
    if resolved is None:
        model.weight_report = WeightReport(source="none", num_classes=num_classes, notes=["random initialisation"])
        return model
    report, head_state = load_encoder_weights(encoder, resolved, name)
    report.num_classes = num_classes
    if pretrained_head and head_matches(model.head, head_state):
        model.head.load_state_dict({"weight": head_state["weight"], "bias": head_state["bias"]})
        report.head_reinitialized = False
    else:
        report.head_reinitialized = True
        report.notes.append(f"head re-initialised for {num_classes} classes")
    model.weight_report = report
    return model
