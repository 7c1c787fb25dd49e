"""The one weight loader for every checkpoint format users meet, and sap's own checkpoint files.

Formats read by :func:`load_weights` (SPEC §5):

* raw state dicts, and ``{"state_dict": …}`` / ``{"model": …}`` wrappers;
* ``module.`` (DDP), ``backbone.`` and ``_orig_mod.`` (``torch.compile``) prefixes, and
  ``swin_vit`` spelled for ``swinViT``;
* MONAI's published SSL encoder (Tang et al.): ``{"state_dict": {"module.patch_embed…",
  "module.layers1.0.blocks.0.mlp.fc1.weight", …}}`` — encoder keys without ``swinViT.`` and
  ``fc1``/``fc2`` for what MONAI now calls ``linear1``/``linear2``;
* reference-SAP checkpoints (``{"state_dict": full SwinUNETR state, "epoch"}``, sometimes
  ``module.``-prefixed);
* sap's own checkpoints (:func:`save_checkpoint`), which carry their config, channel names,
  MONAI version, patch-merging layout, threshold and minimum lesion volume.

Every load prints and returns a :class:`LoadReport` and raises :class:`SapError` when less than
the expected part loads: ``ssl`` = every ``swinViT.*`` tensor, ``sap`` = every tensor except
``out.*``, ``full`` = every tensor. Never a silent ``strict=False``.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sap.errors import SapError
from sap.files import atomic_write
from sap.models.swin import has_patch_merging, patch_merging_layout, set_patch_merging

#: the format sap writes. v2 (the stage runner): ``best.pt`` and ``last.pt`` of every stage hold the
#: same keys, the training state included; what wrote it is under ``run``, tensors of the trained
#: model outside ``state_dict`` (SSL heads) under ``extra_state``. v1: the same weights and
#: metadata, with ``init``/``fold``/``stage`` at the top and the SSL heads under ``ssl_heads``.
CHECKPOINT_FORMAT = "sap-checkpoint-v2"
READABLE_FORMATS = ("sap-checkpoint-v1", CHECKPOINT_FORMAT)
EXPECT_CHOICES = ("ssl", "sap", "full")

#: Input-layer weights whose dimension 1 is the number of image channels (Swin UNETR).
INPUT_LAYER_KEYS = (
    "swinViT.patch_embed.proj.weight",
    "encoder1.layer.conv1.conv.weight",
    "encoder1.layer.conv3.conv.weight",
)

_PREFIXES = ("module.", "backbone.", "_orig_mod.")


@dataclass
class LoadReport:
    """What a weight load did. Counts are tensors (state-dict entries), not parameters."""

    source: str
    source_format: str  #: sap | reference-sap | monai-ssl | state-dict
    expect: str
    source_layout: str | None  #: patch-merging layout of the weights (None: unknown)
    model_layout: str  #: layout the model computes after loading
    n_expected: int
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  #: expected, absent from the source
    unexpected: list[str] = field(default_factory=list)  #: in the source, not in the model
    mismatched: list[str] = field(default_factory=list)  #: present in both, other shape
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)  #: mismatched: (source, model)
    stored_config: Mapping[str, Any] | None = None  #: the config a sap checkpoint was trained with
    skipped: list[str] = field(default_factory=list)  #: in both, outside the expected part
    adapted: list[str] = field(default_factory=list)  #: input layers adapted to the channel count

    @property
    def complete(self) -> bool:
        return self.n_expected > 0 and len(self.loaded) == self.n_expected

    def summary(self) -> str:
        layout = self.source_layout or "unknown"
        text = (
            f"{self.source} ({self.source_format}, expect {self.expect}): loaded {len(self.loaded)}/"
            f"{self.n_expected} expected tensors; missing {len(self.missing)}, unexpected "
            f"{len(self.unexpected)}, shape-mismatched {len(self.mismatched)}, outside the expected part "
            f"{len(self.skipped)}"
        )
        if self.adapted:
            text += f", channel-adapted {len(self.adapted)}"
        return text + f"; patch merging {layout} → model {self.model_layout}"


# ------------------------------------------------------------------------------------ reading
def read_checkpoint(source: str | Path | Mapping[str, Any], allow_pickle: bool = False) -> Any:
    """The object stored in a checkpoint file (or ``source`` itself when already loaded).

    Files are read with ``torch.load(weights_only=True)``; a file that needs arbitrary pickled
    objects is refused unless ``allow_pickle`` (only for files you trust).
    """
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if not path.is_file():
        raise SapError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):
            raise SapError(
                f"{path}: checkpoint holds pickled Python objects beyond tensors, which sap does not load; "
                "re-save only its weights, e.g. torch.save(model.state_dict(), PATH)"
            ) from exc
        raise SapError(
            f"{path}: not a PyTorch checkpoint (its bytes do not decode as one); the file is corrupt, "
            "truncated or of another format: pass the .pt file that training wrote"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SapError(
            f"{path}: not a readable PyTorch checkpoint ({first[:120]}); the file is corrupt, truncated "
            "or of another format"
        ) from exc


def check_finite_weights(state: Mapping[str, torch.Tensor], name: str) -> None:
    """Refuse weights holding NaN or Inf: they predict NaN everywhere, which reads as "no lesion"."""
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise SapError(
            f"{name}: {len(bad)} weight tensor(s) hold NaN/Inf values ({shown}); the training that wrote it "
            "diverged: use an earlier checkpoint (best.pt) or retrain with a lower learning rate"
        )


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def _unwrap(obj: Any, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, metadata) from any wrapper; metadata = the wrapper's other entries."""
    if _is_state_dict(obj):
        return dict(obj), {}
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict", "network_weights"):
            inner = obj.get(key)
            if _is_state_dict(inner):
                return dict(inner), {k: v for k, v in obj.items() if k != key}
    raise SapError(f"{name}: no state dict found (expected a tensor mapping or a 'state_dict'/'model' entry)")


def normalise_keys(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """Rename keys to MONAI SwinUNETR's: strip wrapper prefixes, ``swin_vit`` → ``swinViT``, and map
    MONAI's SSL encoder layout (no ``swinViT.``, ``mlp.fc1``/``fc2``) into the full model.

    Returns (renamed state, whether the MONAI-SSL encoder layout was recognised).
    """
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        renamed[key.replace("swin_vit", "swinViT")] = value
    ssl_layout = any(k.startswith(("patch_embed.", "layers1.")) for k in renamed)
    if ssl_layout:
        out = {}
        for key, value in renamed.items():
            if key.startswith(("patch_embed.", "layers1.", "layers2.", "layers3.", "layers4.")):
                key = "swinViT." + key
            out[key] = value
        renamed = out
    # MONAI's old MLP block names (Tang's SSL weights) → MLPBlock's linear1/linear2.
    renamed = {re.sub(r"\.mlp\.fc([12])\.", r".mlp.linear\1.", k): v for k, v in renamed.items()}
    return renamed, ssl_layout


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in re.split(r"[.+]", str(text))[:3]:
        digits = re.match(r"\d+", piece)
        parts.append(int(digits.group()) if digits else 0)
    return tuple(parts)


def checkpoint_layout(metadata: Mapping[str, Any], source_format: str) -> str | None:
    """Patch-merging layout the weights were trained with (None when nothing says).

    sap files record it; MONAI-SSL and reference-SAP files predate MONAI 1.5, so ``legacy``.
    """
    if source_format == "sap":
        if metadata.get("patch_merging") in ("legacy", "current"):
            return str(metadata["patch_merging"])
        version = metadata.get("monai_version")
        if version:
            return "legacy" if _version_tuple(version) < (1, 5) else "current"
        return None
    if source_format in ("monai-ssl", "reference-sap"):
        return "legacy"
    return None


def describe_source(
    source: str | Path | Mapping[str, Any], allow_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any], str, str | None, str]:
    """Read and normalise a checkpoint: (state, metadata, format, layout, display name)."""
    name = str(source) if not isinstance(source, Mapping) else "<state dict>"
    obj = read_checkpoint(source, allow_pickle=allow_pickle)
    state, metadata = _unwrap(obj, name)
    state, ssl_layout = normalise_keys(state)
    if check_format(metadata.get("format"), name):
        source_format = "sap"
    elif ssl_layout:
        source_format = "monai-ssl"
    elif "epoch" in metadata and any(k.startswith("swinViT.") for k in state):
        source_format = "reference-sap"
    else:
        source_format = "state-dict"
    return state, metadata, source_format, checkpoint_layout(metadata, source_format), name


def check_format(value: Any, name: str) -> bool:
    """True for a sap checkpoint this version reads, False for no sap checkpoint; an error naming
    the version for a sap checkpoint of a format this version does not know."""
    if value in READABLE_FORMATS:
        return True
    if isinstance(value, str) and value.startswith("sap-checkpoint-"):
        raise SapError(
            f"{name}: checkpoint format {value} is not one this sap reads ({', '.join(READABLE_FORMATS)}); "
            "use the sap version that wrote it"
        )
    return False


# ------------------------------------------------------------------------------------ loading
def expected_keys(model_state: Mapping[str, torch.Tensor], expect: str) -> list[str]:
    """Keys of the model that a load with ``expect`` must fill."""
    if expect == "ssl":
        return [k for k in model_state if k.startswith("swinViT.")]
    if expect == "sap":
        return [k for k in model_state if not k.startswith("out.")]
    if expect == "full":
        return list(model_state)
    raise SapError(f"expect={expect!r} is not one of {', '.join(EXPECT_CHOICES)}")


def adapt_input_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """Input-layer weight ``(out, c_src, …)`` → ``(out, channels, …)``: the source channels'
    sum spread evenly over the new channels, so an image repeated over the channels gives the
    same response as the source did."""
    merged = weight.sum(dim=1, keepdim=True) / channels
    return merged.repeat(1, channels, *([1] * (weight.dim() - 2))).contiguous()


def load_weights(
    model: nn.Module,
    source: str | Path | Mapping[str, Any],
    expect: str = "full",
    layout: str = "auto",
    adapt_channels: bool = False,
    allow_pickle: bool = False,
    verbose: bool = True,
    name: str | None = None,
) -> LoadReport:
    """Load the ``expect`` part of a checkpoint into a Swin UNETR, in place.

    Args:
        model: a MONAI ``SwinUNETR`` (possibly from :func:`sap.models.swin.build_swin_unetr`).
        source: a checkpoint path or an already loaded object, in any format of the module doc.
        expect: ``ssl`` (every ``swinViT.*`` tensor; the ``encoder*`` skip blocks stay random),
            ``sap`` (everything but the ``out.*`` head) or ``full`` (everything).
        layout: patch-merging layout for the model: ``auto`` switches the model to the layout
            the weights were trained with when the file says (sap files record it; MONAI-SSL and
            reference-SAP files are ``legacy``), ``legacy``/``current`` force one.
        adapt_channels: adapt a channel-count mismatch of the input layers (e.g. 1-channel CT
            weights into a 2-channel model); without it such a mismatch fails the load.
        name: how messages name an already loaded ``source`` (its file).

    Returns the :class:`LoadReport` (also printed when ``verbose``). Tensors outside the expected
    part are left untouched even when the source has them.

    Raises:
        SapError: unreadable file, no state dict inside, or fewer than 100 % of the expected
            tensors loaded with matching shapes; the message carries the counts.
    """
    state, metadata, source_format, source_layout, described = describe_source(source, allow_pickle)
    name = name or described
    model_state = model.state_dict()
    wanted = expected_keys(model_state, expect)
    wanted_set = set(wanted)
    report = LoadReport(
        source=name,
        source_format=source_format,
        expect=expect,
        source_layout=source_layout,
        model_layout=patch_merging_layout(model),
        n_expected=len(wanted),
        stored_config=metadata.get("config") if source_format == "sap" else None,
    )
    in_channels = model_state["swinViT.patch_embed.proj.weight"].shape[1]
    to_load: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in model_state:
            report.unexpected.append(key)
            continue
        if key not in wanted_set:
            report.skipped.append(key)
            continue
        target = model_state[key]
        if value.shape != target.shape:
            channel_only = (
                key in INPUT_LAYER_KEYS
                and value.dim() == target.dim()
                and value.shape[0] == target.shape[0]
                and value.shape[2:] == target.shape[2:]
            )
            if channel_only and adapt_channels:
                value = adapt_input_channels(value, in_channels)
                report.adapted.append(key)
            else:
                report.mismatched.append(key)
                report.shapes[key] = (tuple(value.shape), tuple(target.shape))
                continue
        to_load[key] = value.to(dtype=target.dtype)
        report.loaded.append(key)
    report.missing = [k for k in wanted if k not in state]

    if not report.complete:
        hint = ""
        if report.mismatched:
            hint = " " + mismatch_hint(report.shapes, report.stored_config)
            if any(_channel_only(k, *report.shapes[k]) for k in report.mismatched):
                hint += "; adapt the input channels on request with adapt_channels"
        elif not report.loaded:
            hint = " (this does not look like a Swin UNETR checkpoint of this model)"
        raise SapError(f"{report.summary()}: less than the expected part loaded{hint}")

    check_finite_weights(to_load, name)
    with torch.no_grad():
        model.load_state_dict({**model_state, **to_load}, strict=True)
    if layout == "auto":
        if source_layout is not None:
            set_patch_merging(model, source_layout)
    else:
        set_patch_merging(model, layout)
    report.model_layout = patch_merging_layout(model)
    if verbose:
        print(f"weights: {report.summary()}")
    return report


def _channel_only(key: str, source: tuple[int, ...], model: tuple[int, ...]) -> bool:
    """True when an input-layer tensor differs only in its channel dimension."""
    return key in INPUT_LAYER_KEYS and len(source) == len(model) and source[:1] + source[2:] == model[:1] + model[2:]


def _setting_of(key: str, source: tuple[int, ...], model: tuple[int, ...]) -> str:
    """The setting that decides the shape of tensor ``key`` of a Swin UNETR."""
    if "relative_position_bias_table" in key:
        return "model.num_heads"  # (window positions, heads)
    if key.startswith("out."):
        return "the number of output classes"
    if key in INPUT_LAYER_KEYS and source[:1] + source[2:] == model[:1] + model[2:]:
        return "data.channels"
    return "model.feature_size"


def mismatch_hint(
    shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]], stored_config: Mapping[str, Any] | None = None
) -> str:
    """Name the tensors whose shapes differ and the config keys that decide them, with the values
    the checkpoint was trained with when its config is known."""
    names = list(shapes)
    shown = ", ".join(f"{k} {list(shapes[k][0])} vs model {list(shapes[k][1])}" for k in names[:3])
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    settings = list(dict.fromkeys(_setting_of(k, *shapes[k]) for k in names))
    stored = []
    for setting in settings:
        section, _, name = setting.partition(".")
        node = (stored_config or {}).get(section)
        if name and isinstance(node, Mapping) and name in node:
            stored.append(f"{setting}={node[name]}")
    text = f"(shapes differ: {shown}{more}; set {' / '.join(settings)} as the checkpoint was trained"
    return text + (f": {', '.join(stored)})" if stored else ")")


def restore_model(model: nn.Module, checkpoint: Mapping[str, Any], name: str = "checkpoint") -> nn.Module:
    """Put a sap checkpoint written from this kind of model back into it, every tensor exactly
    (``--resume``): the patch-merging layout, ``state_dict`` and ``extra_state`` (v1:
    ``ssl_heads``). Other shapes are an error naming the tensors and the config keys to change."""
    if checkpoint.get("patch_merging"):
        set_patch_merging(model, checkpoint["patch_merging"])
    state = {**checkpoint["state_dict"], **checkpoint.get("extra_state", checkpoint.get("ssl_heads", {}))}
    model_state = model.state_dict()
    missing = sorted(set(model_state) - set(state))
    unexpected = sorted(set(state) - set(model_state))
    shapes = {
        k: (tuple(v.shape), tuple(model_state[k].shape))
        for k, v in state.items()
        if k in model_state and tuple(v.shape) != tuple(model_state[k].shape)
    }
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing ({', '.join(missing[:3])})"] if missing else []
        parts += [f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])})"] if unexpected else []
        hint = " " + mismatch_hint(shapes, checkpoint.get("config")) if shapes else ""
        raise SapError(f"{name}: checkpoint does not fit the model: {'; '.join(parts) or f'{len(shapes)} shape-mismatched'}{hint}")
    check_finite_weights(state, name)
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return model


# ------------------------------------------------------------------------------------ sap files
def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through a temporary sibling and a rename: a kill never leaves half a file."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def make_checkpoint(
    model: nn.Module,
    *,
    config: Mapping[str, Any],
    channels: list[str],
    kind: str,
    out_channels: int,
    threshold: float = 0.5,
    min_volume_ml: float = 0.0,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A sap checkpoint dict (SPEC §1): weights plus what is needed to use them correctly.

    ``kind`` says what the weights are (``skeletal``, ``ssl``, ``lesion``); ``state_dict``
    replaces ``model.state_dict()`` (e.g. only the encoder for SSL). ``extra`` entries (training
    state for ``--resume``, metrics) are stored alongside and must be plain Python/tensors.
    """
    import monai

    state = state_dict if state_dict is not None else model.state_dict()
    return {
        "format": CHECKPOINT_FORMAT,
        "kind": kind,
        "state_dict": {k: v.detach().cpu() for k, v in state.items()},
        "config": dict(config),
        "channels": list(channels),
        "in_channels": len(channels),
        "out_channels": int(out_channels),
        "monai_version": monai.__version__,
        "patch_merging": patch_merging_layout(model) if has_patch_merging(model) else None,
        "threshold": float(threshold),
        "min_volume_ml": float(min_volume_ml),
        **extra,
    }


def save_checkpoint(checkpoint: Mapping[str, Any], path: str | Path) -> Path:
    """Write a checkpoint made by :func:`make_checkpoint`, atomically."""
    if not check_format(checkpoint.get("format"), str(path)):
        raise SapError(f"{path}: refusing to save a dict that is not a sap checkpoint")
    return atomic_torch_save(dict(checkpoint), path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a sap checkpoint (weights plus metadata); other formats are refused here."""
    obj = read_checkpoint(path)
    if not isinstance(obj, Mapping) or not check_format(obj.get("format"), str(path)):
        raise SapError(f"{path}: not a sap checkpoint (use load_weights for foreign weight files)")
    return dict(obj)
