"""One registry for every encoder, in the spirit of timm's create_model.

    @register_encoder("name", spatial_dims=2, weights=(PackageWeights(...), HubWeights(...)))
    def build(in_chans=1, **kw) -> Encoder: ...

    model = create_classifier("efficientnet_lite0", num_classes=2)

An encoder declares its spatial dims, feature dim, ordered layer groups, input
normalisation and where its pretrained weights can come from; `create_classifier`
builds it, resolves and loads the weights (file > package > hub, see medxfer.models.weights)
and puts a linear head on top. `medxfer models` lists the registry.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
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
_loaded = False


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


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        import medxfer.models.encoders_2d  # noqa: F401  (registers on import)
        import medxfer.models.encoders_3d  # noqa: F401


def list_encoders(spatial_dims: int | None = None) -> list[str]:
    _load_builtin()
    return [n for n, e in _REGISTRY.items() if spatial_dims is None or e.spatial_dims == spatial_dims]


def get_entry(name: str) -> EncoderEntry:
    _load_builtin()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise MedxferError(f"unknown encoder {name!r}.{hint} Known: {', '.join(_REGISTRY)} (see `medxfer models`)")
    return _REGISTRY[name]


def default_encoder(spatial_dims: int) -> str:
    return DEFAULT_ENCODERS[spatial_dims]


def _check_dims(entry: EncoderEntry, spatial_dims: int | None) -> None:
    if spatial_dims is not None and spatial_dims != entry.spatial_dims:
        others = ", ".join(list_encoders(spatial_dims))
        raise MedxferError(
            f"encoder {entry.name!r} is {entry.spatial_dims}D but the data is {spatial_dims}D; "
            f"choose a {spatial_dims}D encoder: {others}"
        )


def build_encoder(name: str, in_chans: int = 1, spatial_dims: int | None = None, **kw: Any) -> Any:
    """The encoder alone, randomly initialised."""
    entry = get_entry(name)
    _check_dims(entry, spatial_dims)
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
):
    """Build encoder `name` with pretrained weights and a fresh `num_classes` linear head.

    weights: "default" (package, then hub), "package", "hub", None/"none" (random init),
    or a local file. pretrained_head keeps the source's classifier when its shape
    matches num_classes (e.g. the 1000 ImageNet classes); otherwise the head is new.
    Extra keyword arguments go to the encoder (e.g. shortcut_type for MedicalNet).
    """
    from medxfer.models.classifier import Classifier
    from medxfer.models.heads import head_matches
    from medxfer.models.weights import WeightReport, load_encoder_weights, resolve_weights

    entry = get_entry(name)
    _check_dims(entry, spatial_dims)
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


# --- `medxfer models` ------------------------------------------------------------------------


def _count_parameters(name: str) -> tuple[int, int, list[tuple[str, int]], str]:
    # On the meta device nothing is allocated or initialised, so listing ~20 encoders is instant.
    with torch.device("meta"):
        enc = build_encoder(name, in_chans=1)
    groups = [(g.name, g.num_parameters()) for g in enc.layer_groups()]
    total = sum(p.numel() for p in enc.parameters())
    return total, int(enc.feature_dim), groups, enc.normalization.describe()


@dataclass
class ModelsResult:
    encoders: list[dict[str, Any]]
    online: bool

    def summary(self) -> dict[str, Any]:
        return {
            "online": self.online,
            "defaults": {f"{k}d": v for k, v in DEFAULT_ENCODERS.items()},
            "transfer_2d_to_3d": TRANSFER_NOTE,
            "encoders": self.encoders,
        }

    def table(self) -> tuple[str, list[tuple[str, str]]]:
        rows = []
        for e in self.encoders:
            srcs = []
            for w in e["weights"][1:]:  # [0] is "file", always possible
                state = (
                    "ready offline"
                    if w["offline"]
                    else "downloadable"
                    if w["available"]
                    else "not installed"
                    if w["kind"] == "package"
                    else "needs network"
                )
                srcs.append(f"{w['kind']} {state}")
            groups = " > ".join(g["name"] for g in e["layer_groups"])
            default = " *" if e["default"] else ""
            rows.append(
                (
                    f"{e['name']}{default}",
                    f"{e['spatial_dims']}D, {e['parameters'] / 1e6:.1f}M params, {e['feature_dim']} features, "
                    f"{e['pretraining']}\nweights: file"
                    + "".join(f"; {s}" for s in srcs)
                    + f"\ngroups: {groups}\ninput: {e['normalization'].split(':')[0]}",
                )
            )
        rows.append(("* defaults", ", ".join(f"{k}D {v}" for k, v in DEFAULT_ENCODERS.items())))
        rows.append(("2D->3D", TRANSFER_NOTE))
        state = "online" if self.online else "offline"
        return f"Encoders ({state}; weights: file > package > hub; details: --json)", rows


def models_command() -> ModelsResult:
    from medxfer.models.weights import availability, is_online

    _load_builtin()
    out = []
    for name, entry in _REGISTRY.items():
        total, fdim, groups, norm = _count_parameters(name)
        out.append(
            {
                "name": name,
                "spatial_dims": entry.spatial_dims,
                "parameters": total,
                "feature_dim": fdim,
                "pretraining": entry.pretraining,
                "description": entry.description,
                "default": DEFAULT_ENCODERS.get(entry.spatial_dims) == name,
                "weights": availability(entry.weights),
                "layer_groups": [{"name": g, "parameters": n} for g, n in groups]
                + [{"name": "head", "parameters": None}],
                "normalization": norm,
            }
        )
    return ModelsResult(out, is_online())
