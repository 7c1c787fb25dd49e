"""One way to run training: the stage runner and the pieces it is made of.

Not a trainer class (STYLE.md): a stage supplies its model, batches, step and validation
(:class:`StageParts`, built by its ``setup``) and a few plain values (:class:`StageSpec`);
:func:`run_stage` does everything else the same way for every stage: accelerator, output-folder
policy, resume and its refusals, best/last checkpoints, logs, ``summary.json`` and the progress
bar. Everything counts in optimiser steps (SPEC §6, §7).

* :func:`run_stage`: the runner (see its docstring); :func:`train_loop` is its loop.

* :func:`warmup_cosine_schedule`: linear warm-up, then cosine to zero at ``max_steps``.
* :func:`make_accelerator`: ``accelerate`` on CPU or GPU, fp16 AMP only on CUDA, so
  ``accelerate launch -m sap.<stage>`` and a plain ``python -m`` run the same code.
* :func:`deterministic_kernels`: deterministic algorithms on CPU, so the same command gives the
  same weights twice.
* :func:`training_state` / :func:`restore_training_state`: optimiser, scheduler, AMP scaler, step,
  best metric and every RNG (torch, CUDA, Python, the sampler's numpy generator), stored inside
  ``last.pt`` so ``--resume`` continues to the same weights as an uninterrupted run.
* :class:`RunLogger`: ``log.csv`` (one row per logged step, fixed columns) and TensorBoard.
* :func:`prepare_out_dir`: ``--overwrite`` / ``--resume`` rules of a stage folder.
"""

from __future__ import annotations

import contextlib
import csv
import math
import random
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from sap.config import Config, config_differences, save_config
from sap.errors import SapError
from sap.files import folder_lock, make_folder, write_error, write_json
from sap.memory import keep_freed_memory, return_freed_memory
from sap.models.weights import (
    CHECKPOINT_FORMAT,
    load_checkpoint,
    make_checkpoint,
    restore_model,
    save_checkpoint,
)
from sap.run_layout import STAGE_FILES


# ------------------------------------------------------------------------------------ schedule
def warmup_cosine_factor(step: int, max_steps: int, warmup_steps: int) -> float:
    """Learning-rate factor after ``step`` optimiser steps: linear warm-up over ``warmup_steps``
    (first step at 1/(warmup_steps+1)), then half a cosine from 1 to 0 at ``max_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, max_steps: int, warmup_fraction: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over optimiser steps; warm-up length = round(``warmup_fraction`` × ``max_steps``)."""
    if max_steps < 1:
        raise SapError(f"max_steps must be at least 1, got {max_steps}")
    warmup = int(round(warmup_fraction * max_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, max_steps, warmup)
    )


# ------------------------------------------------------------------------------------ accelerate
def make_accelerator(amp: bool = True) -> Any:
    """An :class:`accelerate.Accelerator`: CPU when there is no CUDA (gloo under
    ``accelerate launch``), fp16 autocast + grad scaling only on CUDA with ``amp``."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cuda = torch.cuda.is_available()
    # accelerate keeps one global state per process; a second stage in the same process (sap cv,
    # notebooks) may ask for another precision, so drop the old settings (the process group stays).
    AcceleratorState._reset_state()
    return Accelerator(cpu=not cuda, mixed_precision="fp16" if (amp and cuda) else "no")


@contextlib.contextmanager
def deterministic_kernels() -> Iterator[None]:
    """Run a CPU training stage with ``torch.use_deterministic_algorithms(True)``, then restore.

    Without it two runs of the same CPU fine-tune drifted apart from step 21 and ended one lesion
    apart on a demo seed; with it they are bit-identical at the same speed (BENCHMARKS.md,
    "Deterministic CPU training"). Not on CUDA: there it would need
    ``CUBLAS_WORKSPACE_CONFIG`` and slower deterministic cuDNN kernels, a cost a multi-GPU
    study should not pay silently, so GPU runs stay reproducible only up to atomic-add order.
    """
    if torch.cuda.is_available():
        yield
        return
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@contextlib.contextmanager
def reused_memory(enabled: bool = True) -> Iterator[bool]:
    """:func:`sap.memory.keep_freed_memory` for the duration of a CPU training loop, then restore.

    Not for SSL pretraining: its four differently shaped views fragment a never-trimmed heap and
    resident memory keeps growing (4.5 → 9.6 GB in three demo steps, measured).
    """
    applied = bool(enabled) and not torch.cuda.is_available() and keep_freed_memory()
    try:
        yield applied
    finally:
        if applied:
            return_freed_memory()


# ------------------------------------------------------------------------------------ RNG + state
def capture_rng(generator: np.random.Generator | None = None) -> dict[str, Any]:
    """Every random state a training step may touch, in plain types (loadable weights_only)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": _to_plain(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["numpy_generator"] = generator.bit_generator.state
    return state


def restore_rng(state: Mapping[str, Any], generator: np.random.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "numpy_generator" in state:
        generator.bit_generator.state = state["numpy_generator"]


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return [_to_plain(o) for o in obj]
    return obj


def _to_tuple(obj: Any) -> Any:
    if isinstance(obj, list):
        return tuple(_to_tuple(o) for o in obj)
    return obj


@dataclass
class LoopState:
    """Where a run stands: optimiser steps done and the best validation score so far."""

    step: int = 0
    best_metric: float = -math.inf
    best_step: int = -1


def training_state(
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    accelerator: Any,
    loop: LoopState,
    generator: np.random.Generator | None = None,
) -> dict[str, Any]:
    """Everything ``--resume`` needs besides the weights (stored in ``last.pt``)."""
    scaler = getattr(accelerator, "scaler", None)
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": loop.step,
        "best_metric": loop.best_metric,
        "best_step": loop.best_step,
        "rng": capture_rng(generator),
    }


def restore_training_state(
    state: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    accelerator: Any,
    generator: np.random.Generator | None = None,
) -> LoopState:
    """Inverse of :func:`training_state`; returns the loop position to continue from."""
    if "optimizer" not in state or "step" not in state:
        raise SapError("checkpoint holds no training state (optimiser, step); cannot resume from it")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"], generator)
    return LoopState(step=int(state["step"]), best_metric=float(state["best_metric"]), best_step=int(state["best_step"]))


# ------------------------------------------------------------------------------------ logging
class RunLogger:
    """``log.csv`` with fixed ``columns`` (blank where a row has no value) plus TensorBoard.

    On resume (``resume_step``) rows after that step are dropped, so the log matches the weights.
    Only the main process should log (pass ``enabled=False`` elsewhere).
    """

    def __init__(
        self,
        folder: str | Path,
        columns: Sequence[str],
        resume_step: int | None = None,
        enabled: bool = True,
        tensorboard: bool = True,
    ) -> None:
        self.folder = Path(folder)
        self.columns = ["step", *[c for c in columns if c != "step"]]
        self.enabled = enabled
        self.path = self.folder / "log.csv"
        self._writer = None
        if not enabled:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        kept: list[dict[str, str]] = []
        if resume_step is not None and self.path.is_file():
            with self.path.open(newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]
        try:
            with self.path.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(kept)
        except OSError as exc:
            raise write_error(self.path, exc) from exc
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.folder / "tensorboard"), purge_step=resume_step)
            except ImportError:  # tensorboard is optional: the CSV is the record
                self._writer = None

    def log(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        unknown = set(values) - set(self.columns)
        if unknown:
            raise SapError(f"{self.path}: log values {sorted(unknown)} are not columns of this run")
        try:
            with self.path.open("a", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.columns)
                writer.writerow({"step": step, **{k: _fmt(v) for k, v in values.items()}})
        except OSError as exc:
            raise write_error(self.path, exc) from exc
        if self._writer is not None:
            for key, value in values.items():
                if value is not None and math.isfinite(float(value)):
                    self._writer.add_scalar(key, float(value), step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


# ------------------------------------------------------------------------------------ the loop
class Callback(Protocol):
    """Called after every optimiser step; may return values to log at that step."""

    def __call__(self, loop: LoopState, last: bool) -> Mapping[str, float] | None: ...


def every(n: int, fn: Callable[[LoopState], Mapping[str, float] | None]) -> Callback:
    """A callback running ``fn`` every ``n`` steps and after the last step."""

    def callback(loop: LoopState, last: bool) -> Mapping[str, float] | None:
        if last or (n > 0 and loop.step % n == 0):
            return fn(loop)
        return None

    return callback


def train_loop(
    *,
    model: nn.Module,
    draw_batch: Callable[[], Any],
    step_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, Mapping[str, float]]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    accelerator: Any,
    loop: LoopState,
    max_steps: int,
    callbacks: Iterable[Callback] = (),
    logger: RunLogger | None = None,
    desc: str = "training",
    stop_after: int | None = None,
    progress: bool = True,
    reuse_memory: bool = False,
) -> LoopState:
    """Run optimiser steps ``loop.step + 1 … max_steps``.

    ``draw_batch()`` returns the next batch (already on the device); it must draw all its
    randomness from state captured by :func:`training_state` so a resumed run sees the same
    batches. ``step_fn(model, batch)`` returns (loss, values to log). Callbacks run after each
    step (validation, checkpoints) and their values are logged at that step. ``stop_after``
    ends the loop early after that step (used to test ``--resume``) without the final callbacks.
    ``progress`` shows a tqdm bar (main process only). ``reuse_memory`` runs the loop inside
    :func:`reused_memory` (CPU only; not for SSL's differently shaped views).
    """
    callbacks = list(callbacks)
    show = progress and getattr(accelerator, "is_main_process", True)
    bar = tqdm(total=max_steps, initial=loop.step, desc=desc, disable=not show, dynamic_ncols=True)
    with contextlib.closing(bar), reused_memory(reuse_memory):
        while loop.step < max_steps:
            model.train()
            batch = draw_batch()
            with accelerator.autocast():
                loss, values = step_fn(model, batch)
            if not torch.isfinite(loss.detach()):
                raise SapError(f"{desc}: loss became {float(loss.detach())} at step {loop.step + 1}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            loop.step += 1
            row = {"lr": optimizer.param_groups[0]["lr"], **values}
            last = loop.step == max_steps
            for callback in callbacks:
                extra = callback(loop, last)
                if extra:
                    row.update(extra)
            if logger is not None:
                logger.log(loop.step, row)
            shown = values["loss"] if "loss" in values else float(loss.detach())
            bar.set_postfix(loss=f"{float(shown):.4f}")
            bar.update(1)
            if stop_after is not None and loop.step >= stop_after:
                break
    return loop


def check_out_dir(folder: Path, resume: bool, overwrite: bool) -> list[str]:
    """The ``--overwrite`` / ``--resume`` rules of a stage folder, checked without touching it
    (a stage may call it before reading its data); returns the stage files that exist."""
    existing = [name for name in STAGE_FILES if (folder / name).exists()]
    if resume:
        if not (folder / "last.pt").is_file():
            left = f" (the earlier run stopped before its first checkpoint and left {', '.join(existing)})" if existing else ""
            raise SapError(f"{folder / 'last.pt'}: nothing to resume{left}; start over with --overwrite")
    elif existing and not overwrite:
        if not any((folder / name).is_file() for name in ("last.pt", "best.pt")):
            # killed before its first checkpoint: --resume cannot help
            raise SapError(
                f"{folder}: outputs exist ({', '.join(existing)}) from a run that stopped before its first "
                "checkpoint; nothing to resume: pass --overwrite to start over"
            )
        raise SapError(f"{folder}: outputs exist ({', '.join(existing)}); pass --overwrite or --resume")
    return existing


def prepare_out_dir(folder: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to touch earlier outputs unless ``--overwrite`` (start over) or ``--resume``."""
    existing = check_out_dir(folder, resume, overwrite)
    if resume:
        return
    make_folder(folder)
    if overwrite:
        for name in existing:
            (folder / name).unlink()
        # old event files would mix with the new run's
        shutil.rmtree(folder / "tensorboard", ignore_errors=True)


# ------------------------------------------------------------------------------------ the runner
@dataclass
class StageSpec:
    """What the runner needs to know about a training stage besides its parts (plain values)."""

    kind: str  #: what the weights are (``skeletal``, ``ssl``, ``lesion``, …), stored in checkpoints
    out_dir: Path
    config: Config  #: stored in checkpoints and ``config.yaml``; compared on ``--resume``
    max_steps: int
    val_every: int  #: validate (and write best/last) every so many steps and after the last
    metric: str  #: the validation value that chooses ``best.pt``
    columns: Sequence[str]  #: ``log.csv`` columns besides ``step``
    lower_is_better: bool = False
    warmup_fraction: float = 0.0  #: of the default schedule (:func:`warmup_cosine_schedule`)
    amp: bool = True  #: fp16 autocast, only on CUDA
    seed: int = 0
    desc: str = "training"  #: progress-bar label
    #: config sections the results depend on (dotted names; empty: all), compared on ``--resume``
    sections: Sequence[str] = ()
    ignore: Sequence[str] = ()  #: keys inside ``sections`` that do not matter to this stage
    #: what this run is (e.g. init and fold), stored in checkpoints, must match on ``--resume``
    identity: Mapping[str, Any] = field(default_factory=dict)
    info: Mapping[str, Any] = field(default_factory=dict)  #: stored in checkpoints and the summary
    channels: Sequence[str] = ()  #: input channel names, stored in checkpoints
    out_channels: int = 0
    reuse_memory: bool = False  #: see :func:`train_loop`


@dataclass
class StageContext:
    """What a stage's ``setup`` gets: the accelerator, and the state the runner keeps."""

    accelerator: Any
    generator: np.random.Generator  #: seeded from ``spec.seed``; its state is saved and restored
    loop: LoopState  #: the live position (``loop.step`` = optimiser steps done)
    resuming: bool  #: weights come from ``last.pt``: skip loading pretrained weights
    progress: bool  #: show progress bars (main process only)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    @property
    def rank(self) -> int:
        return int(self.accelerator.process_index)

    @property
    def world_size(self) -> int:
        return int(self.accelerator.num_processes)


@dataclass
class StageParts:
    """What differs between stages: model, batches, step and validation.

    ``draw_batch()`` returns the next batch on the device and must draw its randomness from
    ``StageContext.generator``, torch's RNG or ``cursor`` (all saved), so a resumed run sees the
    same batches. ``step(model, batch)`` returns (loss, values to log). ``validate(model)`` runs on
    the main process with the unwrapped model in eval mode without gradients and returns values
    to log, among them ``spec.metric``. ``export(model)`` gives the checkpoint's ``state_dict``
    (default: the whole model; the rest is kept under ``extra_state`` for ``--resume``).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    draw_batch: Callable[[], Any]
    step: Callable[[nn.Module, Any], tuple[torch.Tensor, Mapping[str, float]]]
    validate: Callable[[nn.Module], Mapping[str, float]]
    scheduler: Any = None  #: default: :func:`warmup_cosine_schedule` over ``spec.max_steps``
    cursor: Any = None  #: sampler position (``state_dict``/``load_state_dict``), saved with the state
    export: Callable[[nn.Module], Mapping[str, torch.Tensor]] | None = None
    callbacks: Sequence[Callback] = ()  #: extra per-step callbacks (values to log)
    summary: Callable[[], Mapping[str, Any]] | None = None  #: extra ``summary.json`` entries


@dataclass
class StageResult:
    """What a stage run produced."""

    out_dir: Path
    steps: int
    best_step: int
    best_metric: float  #: the best ``spec.metric`` (NaN when no validation gave a finite one)
    final_metrics: dict[str, float]
    summary: dict[str, Any]
    seconds: float
    main_process: bool = True  #: False on the other ranks under ``accelerate launch``

    @property
    def best(self) -> Path:
        return self.out_dir / "best.pt"

    @property
    def last(self) -> Path:
        return self.out_dir / "last.pt"


def seed_everything(seed: int) -> np.random.Generator:
    """Seed torch and Python; return the numpy generator a stage draws its own randomness from."""
    random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def read_resumable(path: Path, spec: StageSpec) -> dict[str, Any]:
    """``last.pt`` of an interrupted run of this stage, refused (naming what differs) when it was
    written by another stage or run, or with other settings in ``spec.sections``."""
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != spec.kind or "training" not in ckpt:
        raise SapError(f"{path}: not a resumable {spec.kind} checkpoint")
    stored = ckpt.get("run") if ckpt["format"] == CHECKPOINT_FORMAT else ckpt  # v1: at the top level
    other = {k: stored.get(k) for k, v in spec.identity.items() if stored.get(k) != v}
    if other:
        was = " ".join(f"{k} {v}" for k, v in other.items())
        now = " ".join(f"{k} {spec.identity[k]}" for k in other)
        raise SapError(f"{path}: was written by a run with {was}, not {now}")
    changed = config_differences(ckpt.get("config", {}), spec.config.to_dict(), tuple(spec.sections), tuple(spec.ignore))
    if changed:
        raise SapError(
            f"{path}: the config differs from the one this run started with ({', '.join(changed[:6])}); "
            "resume with the same config or start over with --overwrite"
        )
    return ckpt


def run_stage(
    spec: StageSpec,
    setup: Callable[[StageContext], StageParts],
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> StageResult:
    """Run (or resume) one training stage; everything but its parts is done here.

    The runner makes the accelerator, locks the stage folder (main process only,
    :func:`sap.files.folder_lock`), applies the output-folder policy (:func:`prepare_out_dir`),
    refuses a ``--resume`` with other settings (:func:`read_resumable`), seeds torch, Python and
    the stage's numpy generator, turns on deterministic kernels on CPU (:func:`deterministic_kernels`),
    calls ``setup``, restores weights and training state, runs
    :func:`train_loop` with the progress bar, validates every ``spec.val_every`` steps and after
    the last, and writes ``last.pt`` and ``best.pt`` (the same keys: weights, metadata and
    training state; until a validation gives a finite metric ``best.pt`` follows the latest
    weights, so it always exists),
    ``log.csv`` + TensorBoard, the resolved ``config.yaml`` and ``summary.json`` (NaN as null).
    ``stop_after`` ends the run after that many steps as if it had been killed (tests of
    ``--resume``). Only the main process writes.
    """
    started = time.perf_counter()
    accelerator = make_accelerator(spec.amp)
    # the main process locks the stage folder (created here, when work starts; removed again when a
    # failed start left it empty); accelerate's other ranks write nothing and take no lock
    lock = folder_lock(spec.out_dir) if accelerator.is_main_process else contextlib.nullcontext()
    with lock, deterministic_kernels():
        return _run_locked(spec, setup, accelerator, started, resume, overwrite, progress, stop_after)


def _run_locked(
    spec: StageSpec, setup: Callable[[StageContext], StageParts], accelerator: Any, started: float, resume: bool,
    overwrite: bool, progress: bool, stop_after: int | None,
) -> StageResult:
    """:func:`run_stage` while the main process holds the stage folder's lock."""
    out = Path(spec.out_dir)
    main = accelerator.is_main_process
    if main:
        prepare_out_dir(out, resume, overwrite)
    accelerator.wait_for_everyone()
    stored = read_resumable(out / "last.pt", spec) if resume else None
    loop = LoopState()
    ctx = StageContext(accelerator, seed_everything(spec.seed), loop, stored is not None, progress and main)
    parts = setup(ctx)
    model, optimizer = parts.model, parts.optimizer
    scheduler = parts.scheduler or warmup_cosine_schedule(optimizer, spec.max_steps, spec.warmup_fraction)
    if stored is not None:
        restore_model(model, stored, str(out / "last.pt"))
        vars(loop).update(vars(restore_training_state(stored["training"], optimizer, scheduler, accelerator, ctx.generator)))
        if parts.cursor is not None:
            parts.cursor.load_state_dict(stored["training"]["cursor"])
    # the scheduler stays unprepared: it counts optimiser steps, not steps × processes
    model, optimizer = accelerator.prepare(model, optimizer)
    if main:
        save_config(spec.config, out / "config.yaml")
    logger = RunLogger(out, spec.columns, resume_step=loop.step if stored is not None else None, enabled=main)
    sign = -1.0 if spec.lower_is_better else 1.0
    final: dict[str, float] = {}

    def checkpoint(metrics: Mapping[str, float]) -> dict[str, Any]:
        net = accelerator.unwrap_model(model)
        everything = net.state_dict()
        weights = dict(parts.export(net)) if parts.export is not None else everything
        training = training_state(optimizer, scheduler, accelerator, loop, ctx.generator)
        if parts.cursor is not None:
            training["cursor"] = parts.cursor.state_dict()
        return make_checkpoint(
            net, config=spec.config.to_dict(), channels=list(spec.channels), kind=spec.kind,
            out_channels=spec.out_channels, state_dict=weights, step=loop.step, metrics=dict(metrics),
            training=training, run={**spec.identity, **spec.info},
            extra_state={k: v.detach().cpu() for k, v in everything.items() if k not in weights},
        )  # fmt: skip

    def validate(state: LoopState) -> dict[str, float]:
        values: dict[str, float] = {}
        if main:
            net = accelerator.unwrap_model(model)
            was_training = net.training
            net.eval()
            with torch.no_grad():
                values = dict(parts.validate(net))
            net.train(was_training)
            score = sign * float(values.get(spec.metric, math.nan))
            improved = math.isfinite(score) and score > state.best_metric
            # no finite metric yet (e.g. no validation case): best.pt follows the latest weights
            unscored = not math.isfinite(state.best_metric)
            if improved:
                state.best_metric = score
            if improved or unscored:
                state.best_step = state.step
            ckpt = checkpoint(values)
            if improved or unscored:
                save_checkpoint(ckpt, out / "best.pt")
            save_checkpoint(ckpt, out / "last.pt")
            final.clear()
            final.update(values)
        accelerator.wait_for_everyone()
        return values

    try:
        train_loop(
            model=model, draw_batch=parts.draw_batch, step_fn=parts.step, optimizer=optimizer,
            scheduler=scheduler, accelerator=accelerator, loop=loop, max_steps=spec.max_steps,
            callbacks=[*parts.callbacks, every(spec.val_every, validate)], logger=logger, desc=spec.desc,
            stop_after=stop_after, progress=ctx.progress, reuse_memory=spec.reuse_memory,
        )  # fmt: skip
    finally:
        logger.close()
    best = sign * loop.best_metric if math.isfinite(loop.best_metric) else math.nan
    seconds = time.perf_counter() - started
    summary: dict[str, Any] = {
        **spec.identity, **spec.info, "steps": loop.step, "best_step": loop.best_step,
        f"best_{spec.metric}": best, "final": dict(final), **(dict(parts.summary()) if parts.summary and main else {}),
        "processes": accelerator.num_processes, "device": str(accelerator.device), "seconds": seconds,
    }  # fmt: skip
    if main:
        write_json(out / "summary.json", summary)
    accelerator.wait_for_everyone()
    return StageResult(out, loop.step, loop.best_step, best, dict(final), summary, seconds, main)
