"""``sap infer``: whole-body inference (SPEC §8).

Notebook API::

    from sap.infer import predict, load_model
    prob = predict(["T1.nii.gz", "b1000.nii.gz"], "RUN/sap/fold_1/last.pt")   # (X, Y, Z) RAS+

:func:`run_inference` is what the command line runs: a folder of exams in, probability maps,
lesion instances and lesion tables out. Research use only.
"""

from sap.infer.model import InferenceModel, load_model
from sap.infer.pipeline import (
    InferenceReport,
    InferOptions,
    infer_case,
    predict,
    prepare_image,
    run_inference,
)

__all__ = [
    "InferOptions",
    "InferenceModel",
    "InferenceReport",
    "infer_case",
    "load_model",
    "predict",
    "prepare_image",
    "run_inference",
]
