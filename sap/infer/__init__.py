"""``sap infer``: whole-body inference (SPEC §8).

Notebook API::

    from sap.infer import predict, load_model
    prob = predict(["T1.nii.gz", "b1000.nii.gz"], "RUN/sap/fold_1/last.pt")   # (X, Y, Z) RAS+

:func:`run_inference` is what the command line runs: a folder of exams in, probability maps,
lesion instances and lesion tables out. Research use only.

Names are imported on first use, so ``sap --help`` and ``sap infer --help`` do not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "InferenceModel": "sap.infer.model",
    "load_model": "sap.infer.model",
    "InferOptions": "sap.infer.pipeline",
    "InferenceReport": "sap.infer.pipeline",
    "infer_case": "sap.infer.pipeline",
    "predict": "sap.infer.pipeline",
    "prepare_image": "sap.infer.pipeline",
    "run_inference": "sap.infer.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sap.infer' has no attribute {name!r}")
