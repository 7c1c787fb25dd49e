"""Inference, then tracking: the composing command ``sap track-infer`` (study layer, SPEC §14).

``sap/track`` never imports ``sap/infer``; this module, in the study layer that alone calls
stages, runs :func:`sap.infer.run_inference` on the two exams' images (into ``OUT/infer/``) and
then :func:`sap.track.api.track` with the predicted lesion maps. The tracking outputs are those
of ``sap track``; ``OUT/infer/`` keeps the probability maps and lesion tables of both exams.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from sap.errors import SapError

if TYPE_CHECKING:
    from sap.infer import InferenceModel
    from sap.track.api import TrackOptions, TrackResult


def infer_and_track(
    baseline: str | Path,
    followup: str | Path,
    out: str | Path,
    model: str | Path | InferenceModel,
    options: TrackOptions | None = None,
    truth: str | Path | None = None,
    device: str | None = None,
    baseline_skeleton: str | Path | None = None,
    followup_skeleton: str | Path | None = None,
) -> TrackResult:
    """Predict lesions of both exams with ``model`` (a checkpoint or bundle), then track them.

    Returns the :class:`~sap.track.api.TrackResult`; ``OUT`` is published whole by
    ``sap track``, with ``infer/baseline`` and ``infer/followup`` (the two inference outputs) in it.
    """
    from sap.infer.pipeline import InferOptions, run_inference
    from sap.track.api import TrackOptions, track

    options = options or TrackOptions()
    out = Path(out)
    if out.exists() and not options.overwrite:
        raise SapError(f"{out}: output exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".sap-track-infer-", dir=out.parent))
    try:
        predicted = {}
        for name, case in (("baseline", baseline), ("followup", followup)):
            folder = scratch / name
            report = run_inference(case, folder, model, InferOptions(device=device, progress=options.progress))
            if report.failed:
                raise SapError(f"{case}: inference failed ({report.summary()})")
            predicted[name] = folder
        result = track(baseline, followup, out, options, baseline_lesions=predicted["baseline"],
                       followup_lesions=predicted["followup"], baseline_skeleton=baseline_skeleton,
                       followup_skeleton=followup_skeleton, truth=truth, extra_folders={"infer": scratch})
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
