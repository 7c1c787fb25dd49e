"""The progress display of ``sap cv`` / ``sap demo``: which stage runs and what remains."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO


@dataclass
class Task:
    """One step of a study: a name shown to the user, a budget estimate (s) and the work."""

    name: str
    run: Callable[[], Any]
    estimate_s: float = 0.0


@dataclass
class Progress:
    """Prints ``[i/n] stage … | remaining: … (~N s)`` before each task and a summary line after.

    Lines (not a redrawn bar) because the stages print their own tqdm bars underneath.
    """

    enabled: bool = True
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    prefix: str = "sap cv"
    durations: dict[str, float] = field(default_factory=dict)
    done_before: int = 0  #: steps already shown by a caller (``sap demo`` runs synth first)

    def run(self, tasks: list[Task]) -> dict[str, Any]:
        results: dict[str, Any] = {}
        start = time.perf_counter()
        for i, task in enumerate(tasks):
            remaining = tasks[i + 1 :]
            if self.enabled:
                left = sum(t.estimate_s for t in tasks[i:])
                names = ", ".join(t.name for t in remaining[:4]) + (" …" if len(remaining) > 4 else "")
                eta = f" (~{left / 60:.1f} min of work left)" if left > 0 else ""
                total = self.done_before + len(tasks)
                print(f"{self.prefix} [{self.done_before + i + 1}/{total}] {task.name}{eta}"
                      + (f" | then: {names}" if names else " | last step"), file=self.stream, flush=True)
            t0 = time.perf_counter()
            results[task.name] = task.run()
            self.durations[task.name] = time.perf_counter() - t0
        if self.enabled:
            print(f"{self.prefix}: {len(tasks)} steps done in {(time.perf_counter() - start) / 60:.1f} min",
                  file=self.stream, flush=True)
        return results
