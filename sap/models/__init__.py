"""Networks, weight loading, SSL heads, the sliding-window engine and shared training pieces.

* :mod:`sap.models.swin`: Swin UNETR from config, legacy patch merging, parameter groups.
* :mod:`sap.models.weights`: the one weight loader (:func:`load_weights`) and sap checkpoints.
* :mod:`sap.models.ssl`: Tang et al. SSL heads, views and losses.
* :mod:`sap.models.engine`: :func:`sliding_window_predict`.
* :mod:`sap.models.training`: schedule, resumable state, logger, :func:`train_loop`.
"""

from sap.models.engine import sliding_window_predict
from sap.models.swin import build_swin_unetr, parameter_groups, set_patch_merging
from sap.models.weights import LoadReport, load_checkpoint, load_weights, make_checkpoint, save_checkpoint

__all__ = [
    "LoadReport",
    "build_swin_unetr",
    "load_checkpoint",
    "load_weights",
    "make_checkpoint",
    "parameter_groups",
    "save_checkpoint",
    "set_patch_merging",
    "sliding_window_predict",
]
