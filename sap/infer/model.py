"""What ``sap infer`` runs: one network or an ensemble, with what is needed to use it correctly.

:class:`InferenceModel` holds the network(s), the channel names they expect, the data settings
they were trained with (so preprocessing at inference equals training), the window size and the
operating point (threshold, minimum lesion volume). :func:`load_model` builds one from a sap
checkpoint or a ``sap cv --export`` bundle; :meth:`InferenceModel.from_module` wraps any torch
module (stand-in models in tests, notebooks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from sap.config import Config, DataConfig, InferConfig, config_from_dict
from sap.errors import SapError
from sap.models.bundle import is_bundle, read_bundle
from sap.models.swin import build_swin_unetr
from sap.models.weights import load_checkpoint, load_weights


@dataclass
class InferenceModel:
    """Networks averaged as an ensemble (mean foreground probability) and their settings.

    ``networks`` map ``(B, C, *roi_size)`` to logits ``(B, out_channels, *roi_size)``;
    ``channels`` are the input channel names in order; ``data`` the preprocessing settings;
    ``threshold``/``min_volume_ml`` the operating point stored with the model.
    """

    networks: list[nn.Module]
    channels: list[str]
    data: DataConfig
    roi_size: tuple[int, int, int]
    threshold: float = 0.5
    min_volume_ml: float = 0.0
    out_channels: int = 2
    kind: str = "lesion"
    infer: InferConfig = field(default_factory=InferConfig)
    source: str = "<module>"
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_module(
        cls,
        module: nn.Module | list[nn.Module],
        channels: list[str],
        data: DataConfig | None = None,
        roi_size: tuple[int, int, int] | list[int] = (96, 96, 96),
        threshold: float = 0.5,
        min_volume_ml: float = 0.0,
        out_channels: int = 2,
        kind: str = "lesion",
    ) -> InferenceModel:
        """Wrap a torch module (or several, averaged) with explicit settings."""
        networks = list(module) if isinstance(module, list) else [module]
        data = data if data is not None else DataConfig(channels=list(channels))
        return cls(
            networks=networks,
            channels=list(channels),
            data=data,
            roi_size=tuple(int(r) for r in roi_size),  # type: ignore[arg-type]
            threshold=float(threshold),
            min_volume_ml=float(min_volume_ml),
            out_channels=int(out_channels),
            kind=kind,
        )


def _network_from_checkpoint(ckpt: dict[str, Any], name: str) -> tuple[nn.Module, Config]:
    try:
        cfg = config_from_dict(ckpt.get("config") or {}, source=f"{name} (stored config)")
    except SapError as exc:
        raise SapError(f"{name}: the config stored in the checkpoint is invalid ({exc})") from exc
    in_channels = int(ckpt.get("in_channels", len(ckpt.get("channels", []))))
    out_channels = int(ckpt.get("out_channels", 2))
    network = build_swin_unetr(cfg.model, in_channels, out_channels, patch_merging=ckpt.get("patch_merging"))
    load_weights(network, ckpt, expect="full", layout="auto", verbose=False, name=name)
    network.eval()
    return network, cfg


def _from_checkpoints(ckpts: list[dict[str, Any]], names: list[str], source: str) -> InferenceModel:
    networks, configs = [], []
    for ckpt, name in zip(ckpts, names, strict=True):
        network, cfg = _network_from_checkpoint(ckpt, name)
        networks.append(network)
        configs.append(cfg)
    first, cfg = ckpts[0], configs[0]
    channels = [str(c) for c in first.get("channels", [])]
    if not channels:
        raise SapError(f"{names[0]}: checkpoint stores no channel names")
    for ckpt, other, name in zip(ckpts[1:], configs[1:], names[1:], strict=True):
        if other.model.patch_size != cfg.model.patch_size or int(ckpt.get("out_channels", 2)) != int(
            first.get("out_channels", 2)
        ):
            raise SapError(f"{name}: patch size or output channels differ from {names[0]}")
        if not same_preprocessing(other.data, cfg.data):
            raise SapError(f"{name}: preprocessing settings differ from {names[0]}; fold models must share them")
    return InferenceModel(
        networks=networks,
        channels=channels,
        data=cfg.data,
        roi_size=tuple(int(p) for p in cfg.model.patch_size),  # type: ignore[arg-type]
        threshold=float(first.get("threshold", 0.5)),
        min_volume_ml=float(first.get("min_volume_ml", 0.0)),
        out_channels=int(first.get("out_channels", 2)),
        kind=str(first.get("kind", "lesion")),
        infer=cfg.infer,
        source=source,
        info={"monai_version": first.get("monai_version"), "patch_merging": first.get("patch_merging")},
    )


def _preprocessing(data: DataConfig) -> tuple:
    """The data settings that change the network's input (paths excluded)."""
    return (
        data.modality, tuple(data.channels), data.normalization, tuple(data.percentiles), tuple(data.ct_window),
        None if data.target_spacing is None else tuple(data.target_spacing), data.n4, data.resample_channels,
    )


def same_preprocessing(a: DataConfig, b: DataConfig) -> bool:
    """True when two models see identical network inputs from the same files."""
    return _preprocessing(a) == _preprocessing(b)


def load_model(path: str | Path, expect_kind: str | None = None) -> InferenceModel:
    """A sap checkpoint file, or a bundle folder / its ``bundle.json``, ready for inference.

    A bundle's threshold and minimum volume (tuned for the ensemble) replace the fold
    checkpoints' own. ``expect_kind`` (``lesion`` or ``skeletal``) checks the stored kind and the
    number of output channels (2 for lesion models, 10 for skeletal models).

    Raises :class:`SapError` naming the file for anything that is not a loadable sap model.
    """
    path = Path(path)
    if is_bundle(path):
        bundle = read_bundle(path)
        model = _from_checkpoints(bundle.checkpoints(), [str(p) for p in bundle.model_paths], str(bundle.path))
        model.threshold = bundle.threshold
        model.min_volume_ml = bundle.min_volume_ml
        model.info["bundle_method"] = bundle.method
        model.info["n_models"] = len(bundle.model_paths)
        if bundle.synthetic:
            model.info["synthetic"] = bundle.synthetic_text()
    elif path.is_dir():
        raise SapError(f"{path}: a folder that is not a sap bundle (no bundle.json); pass a checkpoint file or a bundle")
    else:
        model = _from_checkpoints([load_checkpoint(path)], [str(path)], str(path))
        model.info["n_models"] = 1
    if expect_kind == "lesion" and model.out_channels != 2:
        raise SapError(f"{path}: a lesion model has 2 output channels, this one {model.out_channels} (kind {model.kind})")
    if expect_kind == "skeletal" and model.out_channels != 10:
        raise SapError(
            f"{path}: a skeletal model has 10 output channels, this one {model.out_channels} (kind {model.kind})"
        )
    return model
