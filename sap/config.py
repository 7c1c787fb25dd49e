"""Validated configuration: YAML files checked against a typed schema.

Every stage receives one :class:`Config` object. YAML files are parsed into the dataclasses
below; unknown keys and values of the wrong type are errors that list every offending key
(SPEC §1, §13), never silently merged into defaults. ``--set a.b=c`` overrides one key, with the
value parsed as YAML so ``--set finetune.max_steps=20`` gives an int.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from sap.errors import SapError

PresetName = Literal["tiny", "demo", "study-cpu", "paper"]
PRESETS: tuple[str, ...] = typing.get_args(PresetName)


@dataclass
class DataConfig:
    """Where the cohort lives and how images are read and normalised (SPEC §2)."""

    root: str | None = None  #: cohort folder (``--data``)
    healthy: str | None = None  #: healthy cases; default ``ROOT/healthy``
    patients: str | None = None  #: patient cases; default ``ROOT/patients``
    layout: Literal["auto", "case_folders", "nnunet", "datalist"] = "auto"
    label_kind: Literal["lesions", "skeleton"] = "lesions"  #: what nnU-Net/datalist labels hold
    modality: Literal["mr", "ct"] = "mr"
    channels: list[str] = field(default_factory=lambda: ["T1", "b1000"])
    resample_channels: bool = False  #: resample channels/labels onto the first channel's grid
    binarize: bool = False  #: accept any non-zero lesion value as lesion
    normalization: Literal["percentile", "zscore", "ct_window", "none"] = "percentile"  #: none: the images are already normalised
    percentiles: list[float] = field(default_factory=lambda: [1.0, 99.0])
    ct_window: list[float] = field(default_factory=lambda: [-1000.0, 2000.0])
    target_spacing: list[float] | None = None  #: mm, array axis order; None keeps the source spacing
    n4: bool = False  #: N4 bias-field correction (SimpleITK) before normalisation
    cache_dir: str | None = None  #: default ``ROOT/.sap_cache``
    #: largest image (voxels) read; a header declaring more is refused before any allocation
    max_voxels: int = 1_000_000_000
    #: DICOM folders holding several series: the SeriesInstanceUID to read (default: refuse, listing them)
    dicom_series: str | None = None
    #: DICOM slice gaps may differ from the median gap by this fraction of it (missing slices are refused)
    dicom_slice_tolerance: float = 0.01


@dataclass
class ModelConfig:
    """Swin UNETR settings (SPEC §5)."""

    feature_size: int = 48
    #: attention heads per Swin stage; MONAI's default. A stage's width (feature_size x 2^i)
    #: must be divisible by its heads. The small presets use (1, 2, 4, 8): at feature_size 12
    #: the default gives 4-wide heads and the attention costs half of a CPU step.
    num_heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24])
    patch_size: list[int] = field(default_factory=lambda: [96, 96, 96])
    drop_rate: float = 0.1
    attn_drop_rate: float = 0.1
    dropout_path_rate: float = 0.1
    use_checkpoint: bool = False  #: gradient checkpointing (saves GPU memory)
    patch_merging: Literal["auto", "legacy", "current"] = "auto"
    encoder_patterns: list[str] = field(default_factory=lambda: ["swinViT.", "encoder"])


@dataclass
class SSLConfig:
    """Tang et al. 2022 self-supervised baseline (SPEC §6)."""

    temperature: float = 0.5
    mask_ratio: float = 0.3  #: at most this fraction of a crop is dropped
    mask_block_fraction: float = 0.25  #: a block spans at most this fraction of each axis
    crops_per_batch: int = 2  #: crops per batch; each gives two views
    max_steps: int | None = None  #: SSL length in optimiser steps; None = pretrain.max_steps


@dataclass
class PretrainConfig:
    lr: float = 1e-5
    weight_decay: float = 1e-5
    max_steps: int = 10000
    warmup_fraction: float = 0.025
    val_every_steps: int = 500
    batch_size: int = 2
    val_fraction: float = 0.11
    num_workers: int = 0
    amp: bool = True  #: used only on a GPU
    seed: int = 42
    ssl: SSLConfig = field(default_factory=SSLConfig)


@dataclass
class FinetuneConfig:
    lr_scratch: float = 1e-5
    lr_ssl_encoder: float = 5e-6
    lr_ssl_decoder: float = 1e-5
    lr_sap_encoder: float = 2e-6
    lr_sap_decoder: float = 1e-5
    weight_decay: float = 1e-5
    max_steps: int = 20000
    warmup_fraction: float = 0.025
    val_every_steps: int = 1000
    batch_size: int = 2
    sampler: Literal["instance", "posneg"] = "instance"
    #: start the new 2-class head at the training folds' lesion prior (every init alike); false
    #: keeps MONAI's initialisation, which predicts about 50 % lesion everywhere at first
    prior_head: bool = True
    neg_ratio: float = 1.0
    val_fraction: float = 0.1
    num_workers: int = 0
    amp: bool = True
    seed: int = 42


@dataclass
class InferConfig:
    overlap: float = 0.5
    sw_batch_size: int = 2
    tta: bool = False
    threshold: float | None = None  #: None uses the checkpoint's threshold
    min_volume_ml: float | None = None
    amp: bool = True


@dataclass
class EvaluateConfig:
    threshold: float = 0.5
    t_min: float = 0.05
    tolerance_mm: float = 2.0
    connectivity: Literal[6, 18, 26] = 26
    min_volume_ml: float = 0.0
    froc: Literal["candidate", "sweep"] = "candidate"
    volume_threshold_ml: float = 1.0
    n_bootstrap: int = 1000
    seed: int = 0
    workers: int = 1


@dataclass
class TuningConfig:
    grid: list[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 20)])
    objective: Literal["mean_f2", "pooled_f2"] = "mean_f2"
    tune_min_volume: bool = False
    min_volume_ml_grid: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.25, 0.5, 1.0])


@dataclass
class CVConfig:
    k: int = 7
    methods: list[Literal["baseline", "scratch", "ssl", "sap"]] = field(
        default_factory=lambda: ["baseline", "ssl", "sap"]
    )
    checkpoint: Literal["last", "best"] = "last"
    threshold: Literal["shared", "per_fold"] = "shared"
    tuning_in_training: bool = True
    seed: int = 42


@dataclass
class Slice2DConfig:
    """2D CT slice models (SPEC §11, ``sap slice2d``); sizes in pixels, window in HU."""

    model: Literal["unet", "foundation", "sam"] = "unet"
    target: Literal["lesions", "bone"] = "lesions"  #: bone: skeleton > 0
    image_size: int = 512  #: slices are resized to image_size² for the network
    window_level: float = 400.0
    window_width: float = 1800.0
    slice_filter: Literal["all", "foreground", "balanced"] = "balanced"  #: balanced: foreground + as many background
    val_fraction: float = 0.2  #: validation subjects (patient-level split)
    max_steps: int = 2000
    batch_size: int = 4
    #: share of each batch drawn from slices holding the target (nnU-Net oversamples foreground);
    #: null: one shuffled order of all slices
    positive_fraction: float | None = 0.5
    #: start the output bias at the training slices' foreground fraction (U-Net, foundation)
    prior_head: bool = True
    val_every_steps: int = 200
    lr: float = 1.0e-4  #: AdamW, foundation and SAM (paper 000)
    weight_decay: float = 0.01
    unet_lr: float = 0.01  #: SGD + Nesterov momentum 0.99, polynomial decay (nnU-Net)
    unet_base_filters: int = 32
    unet_max_filters: int = 512
    foundation_checkpoint: str | None = None  #: local transformers DINOv3/DINOv2 folder
    foundation_head_channels: list[int] = field(default_factory=lambda: [256, 128, 64])
    freeze_encoder: bool = False  #: foundation / SAM image encoder frozen
    sam_checkpoint: str | None = None  #: local transformers SAM/MedSAM folder
    sam_adapter_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    sam_prompt_tokens: int = 2
    threshold: float = 0.5
    seed: int = 42
    amp: bool = True  #: used only on a GPU
    augment: bool = True  #: paper 000: affine (p 0.7, ±20°, scale 0.9–1.1) and intensity jitter (p 0.8)
    #: with ``augment``, the U-Net's slices are also mirrored left-right (p 0.5): nnU-Net's default
    #: augmentation mirrors, and paper 000 trained its U-Net with nnU-Net's defaults
    unet_mirror: bool = True
    #: the intensity jitter for the U-Net too (off: it shifts a slice by up to ±180 HU and scales it by
    #: ±20 %, which erases the calibrated HU that tell a 1000-HU bone island from a blastic lesion;
    #: benchmarks/slice2d_learning.md, round 4). The foundation and SAM models always jitter, as paper 000.
    unet_intensity_jitter: bool = False
    #: the U-Net's CE term averaged over the hardest k % of each batch's pixels (nnU-Net's Dice +
    #: top-k loss variant, k 10 there); null: over all pixels (paper 000's Dice + CE). With the plain
    #: mean the demo U-Net never learns lytic lesions beside blastic ones; top-k learns both, but its
    #: validation Dice is not better across the demo seeds (benchmarks/slice2d_learning.md, round 5)
    unet_ce_topk_percent: float | None = None
    # zero-shot prompting (paper 001)
    sam_family: Literal["sam", "medsam"] = "sam"  #: medsam: box strategies only
    component_rule: Literal["and", "or"] = "and"  #: and: the authors' code; or: the paper text
    min_component_pixels: int = 15
    min_component_fraction: float = 0.05
    prompt_seed: int = 0


@dataclass
class Config:
    """The whole resolved configuration of a run."""

    scale: PresetName = "paper"  #: stated in reports
    out: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    slice2d: Slice2DConfig = field(default_factory=Slice2DConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Stable hash of the settings that change results (:data:`PATH_KEYS` excluded)."""
        content = without_keys(self.to_dict(), PATH_KEYS)
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


#: Keys that say where inputs and outputs are (or only which inputs are accepted), not what is
#: computed: hashes of settings and the resume check ignore them, so a run folder or cohort can move.
PATH_KEYS = ("out", "data.root", "data.healthy", "data.patients", "data.cache_dir", "data.max_voxels",
             "data.dicom_series", "data.dicom_slice_tolerance")
#: Keys that change only how fast results come (worker processes); a resume may change them. Step
#: hashes keep them, so stored studies keep their hashes.
WORKER_KEYS = ("pretrain.num_workers", "finetune.num_workers", "evaluate.workers")


def without_keys(tree: dict[str, Any], dotted: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Copy of a nested config dict without the ``dotted`` keys (``"data.root"``)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if key in dotted:
            continue
        inner = [d[len(key) + 1 :] for d in dotted if d.startswith(f"{key}.")]
        out[key] = without_keys(value, inner) if inner and isinstance(value, dict) else value
    return out


def config_differences(
    stored: dict[str, Any], current: dict[str, Any], sections: tuple[str, ...] = (), ignore: tuple[str, ...] = ()
) -> list[str]:
    """Dotted keys whose values differ between two config dicts, within ``sections`` (dotted
    names; empty: everywhere), ignoring :data:`PATH_KEYS`, :data:`WORKER_KEYS` and ``ignore``."""
    skip = (*PATH_KEYS, *WORKER_KEYS, *ignore)

    def walk(a: Any, b: Any, prefix: str) -> list[str]:
        if prefix.rstrip(".") in skip:
            return []
        if isinstance(a, dict) and isinstance(b, dict):
            return [d for key in sorted(set(a) | set(b)) for d in walk(a.get(key), b.get(key), f"{prefix}{key}.")]
        return [] if a == b else [prefix.rstrip(".")]

    found = walk(stored, current, "")
    if sections:
        found = [d for d in found if any(d == s or d.startswith(f"{s}.") for s in sections)]
    return found


class ConfigError(SapError):
    """A configuration file or override does not fit the schema."""


# ----------------------------------------------------------------------------------- validation
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_ok(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Check ``value`` against a type annotation; return (ok, coerced value)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            ok, coerced = _type_ok(value, arg)
            if ok:
                return True, coerced
        return False, value
    if annotation is type(None):
        return value is None, value
    if origin is typing.Literal:  # the allowed values, beside the field
        return any(type(value) is type(a) and value == a for a in typing.get_args(annotation)), value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        (item_type,) = typing.get_args(annotation)
        out = []
        for item in value:
            ok, coerced = _type_ok(item, item_type)
            if not ok:
                return False, value
            out.append(coerced)
        return True, out
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return True, float(value)  # PyYAML reads 1e-3 (no dot) as a string
        return False, value
    if annotation is str:
        return isinstance(value, str), value
    return isinstance(value, annotation), value


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict = 2, 40, 40, 4, 4
#: largest config file read (bytes): configs are a few kB; more is a mistake or an attack
MAX_CONFIG_BYTES = 1 << 20


def short_repr(value: Any) -> str:
    """A bounded ``repr`` for messages: never walks more than a few items of a nested value."""
    return _SHORT.repr(value)


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _problem(dotted: str, value: Any, annotation: Any) -> str:
    """One line naming the key and what it accepts (the allowed values of a ``Literal``)."""
    inner = typing.get_args(annotation)[0] if typing.get_origin(annotation) is list else annotation
    if typing.get_origin(inner) is typing.Literal and (typing.get_origin(annotation) is not list or isinstance(value, list)):
        allowed = typing.get_args(inner)
        items = value if inner is not annotation else [value]
        bad = next((v for v in items if not _type_ok(v, inner)[0]), value)
        return f"{dotted}: {short_repr(bad)} is not one of {', '.join(map(str, allowed))}"
    return f"{dotted}: expected {_type_name(annotation)}, got {short_repr(value)}"


def _build(cls: type, raw: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or '<root>'}: expected a mapping, got {type(raw).__name__}")
        return cls()
    for key, value in raw.items():
        if key not in hints:
            shown = str(key) if len(str(key)) <= 60 else str(key)[:57] + "…"
            problems.append(f"{prefix}{shown}: unknown key")
            continue
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _build(annotation, value, f"{prefix}{key}.", problems)
            continue
        ok, coerced = _type_ok(value, annotation)
        if not ok:
            problems.append(_problem(f"{prefix}{key}", value, annotation))
            continue
        kwargs[key] = coerced
    return cls(**kwargs)


#: learning rates: each must be finite and positive (a NaN rate trains to NaN weights silently)
LEARNING_RATES = (
    "pretrain.lr", "finetune.lr_scratch", "finetune.lr_ssl_encoder", "finetune.lr_ssl_decoder",
    "finetune.lr_sap_encoder", "finetune.lr_sap_decoder", "slice2d.lr", "slice2d.unet_lr",
)


def _check_values(cfg: Config, problems: list[str]) -> None:
    """Rules between values that a type cannot state."""
    patch = cfg.model.patch_size
    if len(patch) != 3 or any(p < 32 or p % 32 for p in patch):
        problems.append(f"model.patch_size: {short_repr(patch)} must be three sizes divisible by 32")
    elif all(p == 32 for p in patch):
        # Swin UNETR halves the patch five times (÷32); its bottleneck instance norm needs more
        # than one voxel, so at least one axis must be 64 or more
        problems.append(
            f"model.patch_size: {patch} leaves a 1×1×1 bottleneck after Swin UNETR's five halvings "
            "(÷32), which cannot be trained; make at least one axis 64 or more (e.g. 64, 64, 64)"
        )
    for dotted in LEARNING_RATES:
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        if not (math.isfinite(value) and value > 0):
            problems.append(f"{dotted}: {value} must be a finite positive learning rate")
    channels = cfg.data.channels
    twice = sorted({c for c in channels if channels.count(c) > 1})
    if twice:
        problems.append(f"data.channels: {', '.join(twice)} listed twice in {short_repr(channels)}; each channel is one file")
    if not channels:
        problems.append("data.channels: at least one channel is needed")
    if cfg.data.max_voxels < 1:
        problems.append(f"data.max_voxels: {cfg.data.max_voxels} must be positive")
    tol = cfg.data.dicom_slice_tolerance
    if not (math.isfinite(tol) and tol >= 0):
        problems.append(f"data.dicom_slice_tolerance: {tol} must be a finite fraction >= 0")
    if cfg.model.feature_size % 12:
        problems.append(f"model.feature_size: {cfg.model.feature_size} must be a multiple of 12")
    pf = cfg.slice2d.positive_fraction
    if pf is not None and not 0.0 <= pf <= 1.0:
        problems.append(f"slice2d.positive_fraction: {pf} must be between 0 and 1 (or null)")
    topk = cfg.slice2d.unet_ce_topk_percent
    if topk is not None and not (math.isfinite(topk) and 0.0 < topk <= 100.0):
        problems.append(f"slice2d.unet_ce_topk_percent: {topk} must be a percentage in (0, 100] (or null)")
    if cfg.cv.k < 3:
        problems.append(f"cv.k: {cfg.cv.k} must be at least 3 (tuning fold + two test folds)")


def config_from_dict(raw: dict[str, Any], source: str = "<config>") -> Config:
    """Build a validated :class:`Config`; raise :class:`ConfigError` listing every problem."""
    problems: list[str] = []
    cfg = _build(Config, raw or {}, "", problems)
    if not problems:
        _check_values(cfg, problems)
    if problems:
        shown = [p if len(p) <= 200 else p[:197] + "…" for p in problems[:10]]
        more = f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ConfigError(f"{source}: invalid config: " + "; ".join(shown) + more)
    return cfg


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: a config never needs ``*name`` references, and
    nested aliases expand to billions of values (an "alias bomb") in anything that walks them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(
                f"YAML alias *{short_repr(event.anchor)} at line {event.start_mark.line + 1}: "
                "aliases are not accepted in configs; write the value out"
            )
        return super().compose_node(parent, index)


def safe_yaml(text: str) -> Any:
    """``yaml.safe_load`` without aliases (see :class:`_NoAliasLoader`)."""
    loader = _NoAliasLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=c"`` → ``("a.b", yaml-parsed c)``."""
    if "=" not in text:
        raise ConfigError(f"--set {short_repr(text)}: expected KEY=VALUE, e.g. finetune.max_steps=20")
    key, value = text.split("=", 1)
    if len(value) > MAX_CONFIG_BYTES:
        raise ConfigError(f"--set {key.strip()}: value longer than {MAX_CONFIG_BYTES} characters")
    try:
        parsed = safe_yaml(value) if value != "" else None
    except yaml.YAMLError:
        parsed = value
    except ConfigError as exc:
        raise ConfigError(f"--set {key.strip()}: {exc}") from exc
    return key.strip(), parsed


def preset_path(name: str) -> Path:
    """Path of a configuration shipped inside the package (``tiny``, ``demo``, ``paper``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return Path(str(resources.files("sap") / "configs" / f"{name}.yaml"))


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {size} bytes is too large for a config (at most {MAX_CONFIG_BYTES})")
    try:
        raw = safe_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0][:200]})") from exc
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file ({exc.reason})") from exc
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping")
    return raw or {}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (a file path or a preset name; default ``paper``) plus ``--set`` overrides."""
    if path is None:
        path = preset_path("paper")
    elif str(path) in PRESETS and not Path(str(path)).exists():
        path = preset_path(str(path))
    raw = read_yaml(path)
    if not overrides:
        return config_from_dict(raw, source=str(path))
    config_from_dict(copy.deepcopy(raw), source=str(path))  # the file's own problems are the file's
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
    try:
        return config_from_dict(raw, source=str(path))
    except ConfigError as exc:
        # the file alone is valid, so the overrides are at fault: say so, not the file
        given = ", ".join(t if len(t) <= 80 else t[:77] + "…" for t in overrides)
        problems = str(exc).split(": invalid config: ", 1)[-1]
        raise ConfigError(f"--set {given}: invalid override: {problems}") from exc


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config (atomically) so every output says how it was made."""
    from sap.files import atomic_write_text

    return atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))

