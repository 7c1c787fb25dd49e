"""The ``sap`` console script: one subcommand per stage, each a thin shell over a Python function.

Every subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``; heavy imports
happen inside ``run`` so ``sap --help`` stays fast. Bad input raises :class:`sap.errors.SapError`,
printed here as one line (``sap <cmd>: error: …``) with exit code 2; so is a failed write
(an ``OSError`` naming its file: full disk, no permission).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from sap import RESEARCH_USE_ONLY, __version__
from sap.errors import SapError

if TYPE_CHECKING:
    from sap.config import Config

#: subcommand → (module, one-line help). The module provides add_arguments() and run().
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("sap.data.synth_cli", "write a synthetic cohort (procedural phantom or real anatomy)"),
    "check-data": ("sap.data.check_cli", "validate a cohort against the data rules; writes nothing"),
    "labels": ("sap.data.labels_cli", "convert label maps (TotalSegmentator → SAP skeleton scheme)"),
    "pretrain": ("sap.pretrain.cli", "skeletal or self-supervised pretraining of Swin UNETR"),
    "finetune": ("sap.finetune.cli", "lesion fine-tuning from scratch, SSL or SAP weights"),
    "infer": ("sap.infer.cli", "whole-body inference: probability maps, lesion instances, lesion table"),
    "evaluate": ("sap.evaluate.cli", "lesion-level evaluation: detection, segmentation, FROC, ICC"),
    "cv": ("sap.cv.cli", "the k-fold cross-validated study over the three initialisations"),
    "report": ("sap.cv.report_cli", "(re)build the report of a cv run from stored results"),
    "demo": ("sap.cv.demo_cli", "synth + cv + report at demo scale; needs no files"),
    "slice2d": ("sap.slice2d.cli", "2D CT slice models: train, predict, prompt-bench"),
    "track": ("sap.track.cli", "follow-up exams: registration, lesion tracking and size change between two exams"),
    "track-infer": ("sap.cv.track_cli", "sap infer with a model on two exams' images, then sap track (study layer)"),
}


# ------------------------------------------------------------------------------------ shared options
def add_config_arguments(parser: argparse.ArgumentParser, data: bool = True, out: bool = True) -> None:
    """The options every configurable command shares: ``--config``, ``--set``, ``--data``, ``--out``."""
    parser.add_argument(
        "--config",
        default="paper",
        help="YAML config file, or a shipped preset name (tiny, demo, paper)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set finetune.max_steps=20 (repeatable)",
    )
    if data:
        parser.add_argument("--data", default=None, help="cohort folder (overrides data.root)")
    if out:
        parser.add_argument("--out", default=None, help="run folder for outputs (overrides out)")


def config_from_args(args: Any) -> Config:
    """Resolve ``--config``/``--set``/``--data``/``--out`` into a validated config.

    A cohort whose ``cohort.json`` (``sap synth``) states its channels and modality (``CT`` for a
    CT cohort) is read with them whatever the preset says; keys set with ``--set`` win.
    """
    from sap.config import load_config, parse_override
    from sap.data.cases import read_cohort_json

    overrides = list(getattr(args, "overrides", []) or [])
    cfg = load_config(args.config, overrides)
    if getattr(args, "data", None):
        cfg.data.root = str(args.data)
    if getattr(args, "out", None):
        cfg.out = str(args.out)
    kept = {parse_override(text)[0] for text in overrides}
    meta = read_cohort_json(cfg.data.root) or {}
    channels, modality = meta.get("channels"), meta.get("modality")
    if isinstance(channels, list) and "data.channels" not in kept:
        cfg.data.channels = [str(c) for c in channels]
    if modality in ("mr", "ct") and "data.modality" not in kept:
        cfg.data.modality = modality
    return cfg


# ------------------------------------------------------------------------------------ dispatch
def _load(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise


def _not_built(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        print(f"sap {name}: this stage is not built yet in sap {__version__}", file=sys.stderr)
        return 2

    return run


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sap",
        description=(
            "Whole-body MRI/CT bone-lesion segmentation with supervised anatomical pretraining. "
            + RESEARCH_USE_ONLY
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if only is not None and name != only:
            continue
        module = _load(module_name)
        p = sub.add_parser(
            name,
            help=help_text,
            description=(module.__doc__ or help_text).strip().splitlines()[0] if module else help_text,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        if module is None:
            p.set_defaults(func=_not_built(name))
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        else:
            module.add_arguments(p)
            p.set_defaults(func=module.run)
    return parser


def main(argv: Sequence[str] | None = None, only: str | None = None) -> int:
    """Entry point of ``sap`` (and, with ``only``, of ``python -m sap.<stage>``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if only is not None:
        argv = [only, *argv]
    # Build only the parser of the requested command: keeps start-up light.
    requested = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only=requested)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    prog = f"sap {args.command}"
    try:
        return int(args.func(args) or 0)
    except SapError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # a write outside sap.files' writers (logs, caches, third-party writers) that failed: the
        # same one line as sap.files.WriteError, never a traceback
        if exc.errno is None or exc.filename is None:
            raise
        import errno

        from sap.files import write_error

        writing = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
        message = write_error(exc.filename, exc) if writing else f"{exc.filename}: {exc.strerror}"
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def run_module(command: str) -> None:
    """Body of ``python -m sap.<stage>``."""
    sys.exit(main(only=command))


if __name__ == "__main__":
    sys.exit(main())
