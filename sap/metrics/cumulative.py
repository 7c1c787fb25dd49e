"""Averaging per-case scores over a validation set, in the style of MONAI's cumulative metrics.

MONAI's ``CumulativeIterationMetric`` buffers one result per iteration and reduces them in
``aggregate()``; :class:`CumulativeMean` does the same for sap's per-case scores, numpy only:
``append`` the scores of one case (numbers, or arrays such as one Dice per class), ``aggregate``
the means, ``reset`` for the next validation. Validation during training calls it instead of
averaging by hand.
"""

from __future__ import annotations

import numpy as np


class CumulativeMean:
    """Named per-case scores, each averaged over the cases where it is defined.

    NaN marks a score that is undefined for a case (sensitivity of a lesion-free exam, Dice of a
    class absent from both masks) and is left out of that score's mean, element by element for
    arrays; a mean over no finite value is NaN. Every ``append`` must give arrays of one shape
    per name.
    """

    def __init__(self) -> None:
        self._values: dict[str, list[np.ndarray]] = {}
        self._count = 0

    def append(self, **scores: float | np.ndarray) -> None:
        """Add one case's scores (keyword = score name)."""
        for name, value in scores.items():
            self._values.setdefault(name, []).append(np.array(value, np.float64))  # a copy
        self._count += 1

    def __len__(self) -> int:
        """Cases appended since the last :meth:`reset`."""
        return self._count

    def aggregate(self) -> dict[str, float | np.ndarray]:
        """Mean of every score over the cases where it is finite (a float, or an array for array
        scores); NaN where no case defines it."""
        out: dict[str, float | np.ndarray] = {}
        for name, values in self._values.items():
            stacked = np.stack(values)
            finite = np.isfinite(stacked)
            counts = finite.sum(axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.where(counts > 0, np.where(finite, stacked, 0.0).sum(axis=0) / counts, np.nan)
            out[name] = float(mean) if mean.ndim == 0 else mean
        return out

    def reset(self) -> None:
        self._values.clear()
        self._count = 0
