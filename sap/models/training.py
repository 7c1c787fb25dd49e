"""Reusable training pieces for every stage: schedule, resumable state, logs and the loop.

Not a trainer class (STYLE.md): :func:`train_loop` takes a model, a batch source, a step
function, an optimiser, a scheduler and callbacks; stages compose these. Everything counts in
optimiser steps (SPEC §6, §7).

* :func:`warmup_cosine_schedule`: linear warm-up, then cosine to zero at ``max_steps``.
* :func:`make_accelerator`: ``accelerate`` on CPU or GPU, fp16 AMP only on CUDA, so
  ``accelerate launch -m sap.<stage>`` and a plain ``python -m`` run the same code.
* :func:`training_state` / :func:`restore_training_state`: optimiser, scheduler, AMP scaler, step,
  best metric and every RNG (torch, CUDA, Python, the sampler's numpy generator), stored inside
  ``last.pt`` so ``--resume`` continues to the same weights as an uninterrupted run.
* :class:`RunLogger`: ``log.csv`` (one row per logged step, fixed columns) and TensorBoard.
"""

from __future__ import annotations

import contextlib
import csv
import math
import random
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from sap.errors import SapError
from sap.memory import keep_freed_memory, return_freed_memory


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
        with self.path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)
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
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns)
            writer.writerow({"step": step, **{k: _fmt(v) for k, v in values.items()}})
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


#: Files a training stage writes into its output folder (besides ``tensorboard/``).
RUN_OUTPUT_FILES = ("last.pt", "best.pt", "log.csv", "config.yaml", "summary.json")


def prepare_out_dir(folder: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to touch earlier outputs unless ``--overwrite`` (start over) or ``--resume``.

    Shared by pretraining and fine-tuning (stages never import each other).
    """
    existing = [name for name in RUN_OUTPUT_FILES if (folder / name).exists()]
    if resume:
        if not (folder / "last.pt").is_file():
            raise SapError(f"{folder / 'last.pt'}: nothing to resume (no last checkpoint)")
        return
    if existing and not overwrite:
        raise SapError(f"{folder}: outputs exist ({', '.join(existing)}); pass --overwrite or --resume")
    folder.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in existing:
            (folder / name).unlink()
        # old event files would mix with the new run's
        shutil.rmtree(folder / "tensorboard", ignore_errors=True)
