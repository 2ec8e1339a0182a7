"""`medxfer models`: every registered encoder, its size, layer groups, input and where its weights are."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from medxfer.models.factory import build_encoder
from medxfer.models.registry import DEFAULT_ENCODERS, TRANSFER_NOTE, encoder_entries
from medxfer.models.weights import availability, is_online


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
    out = []
    for entry in encoder_entries():
        name = entry.name
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
