"""The non-learning reference detector of the study (SPEC §10): an intensity threshold inside the body.

Its "probability" map is the lesion-bright channel, normalised exactly as the networks' input is
(:func:`sap.data.preprocess.normalise` with the run's ``data`` settings, over the body mask of
:func:`sap.data.preprocess.body_mask`), clipped to [0, 1], rescaled so that the body's 90th
intensity percentile is 0 (so FROC candidates at t_min are bright structures, not the whole body),
and set to 0 outside the body. The
study then treats it like a network's output: the tuning fold's maps are tuned with the same E9
code, grid and minimum-volume grid, and the test folds are evaluated with the same evaluation
code (:class:`sap.cv.study.Study`). It learns nothing, so a network that does not beat it has
learned nothing useful either.

Channel choice:

* MR: the DWI ``b1000`` channel (matched by name, case-insensitive; metastases are bright on
  high-b-value DWI). A cohort without a channel of that name uses its last channel.
* CT: the CT channel itself, in the configured HU window (``data.ct_window``). Blastic lesions are
  bright there, but so is cortical bone, and lytic lesions are dark: on CT the reference finds
  bone, not lesions, and is only a floor. (The absolute HU deviation from marrow would need a
  marrow level per exam, which is itself a model; we keep the reference free of such choices.)

Maps are on the source grid of the first channel (as the networks' predictions are written), so
``data.target_spacing`` does not apply here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sap.config import Config, DataConfig
from sap.data.cases import Case
from sap.data.preprocess import body_mask, load_case, normalise

#: body intensity percentile that maps to 0 (ours): lesions are far rarer than 10 % of the body
REFERENCE_FLOOR_PERCENTILE = 90.0
#: the lesion-bright MR channel (matched case-insensitively)
MR_LESION_CHANNEL = "b1000"


def lesion_channel(data: DataConfig, channel_names: list[str] | None = None) -> int:
    """Index (in the case's channel order) of the channel the reference thresholds.

    ``channel_names``: the case's channel names (default ``data.channels``). MR: ``b1000``, or the
    last channel when none has that name; CT: the first (CT) channel.
    """
    names = [str(c) for c in (channel_names if channel_names is not None else data.channels)]
    if data.modality == "ct" or len(names) <= 1:
        return 0
    lowered = [n.lower() for n in names]
    return lowered.index(MR_LESION_CHANNEL) if MR_LESION_CHANNEL in lowered else len(names) - 1


def reference_map(image: np.ndarray, channel_names: list[str], data: DataConfig) -> np.ndarray:
    """The reference's pseudo-probability ``(X, Y, Z)`` float32 in [0, 1] from a canonical
    ``(C, X, Y, Z)`` image: the lesion-bright channel normalised over the body mask (both from
    :mod:`sap.data.preprocess`), 0 outside the body."""
    body = body_mask(image, data.modality)
    c = lesion_channel(data, channel_names)
    out = normalise(image[c : c + 1], body, data)[0]
    np.clip(out, 0.0, 1.0, out=out)
    # Rescale so the body's 90th intensity percentile maps to 0 (monotone: still a threshold on
    # the intensity). Without it almost every body voxel lies above t_min = 0.05, the FROC's
    # candidates merge into one body-sized component that "hits" every lesion at 0 FPPI, and the
    # reference's FROC-AUC is the maximum whatever its real false positives.
    inside = body > 0
    if inside.any():
        floor = np.float32(np.percentile(out[inside], REFERENCE_FLOOR_PERCENTILE))
        if floor < 1:
            out -= floor
            out /= np.float32(1.0) - floor
            np.clip(out, 0.0, 1.0, out=out)
    out[~inside] = 0.0
    return out


def reference_probability(case: Case, cfg: Config) -> tuple[np.ndarray, Any]:
    """Reference map of one case on its source grid (canonical order) and the geometry to write it
    with: the same contract as :func:`sap.cv.stages.predict_probability`."""
    loaded = load_case(case, cfg.data)
    prob = reference_map(loaded.image, list(case.channels), cfg.data)
    return prob, loaded.geometry
