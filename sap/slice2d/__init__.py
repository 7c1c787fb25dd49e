"""2D CT slice models (SPEC §11): slice data, 2D metrics, U-Net / foundation / prompt-free SAM models,
zero-shot SAM-family prompting (paper 001) and the detector → SAM hybrid (paper 003).

Modules: :mod:`~sap.slice2d.data` (bone window, orientation, slice sets, patient split),
:mod:`~sap.slice2d.metrics`, :mod:`~sap.slice2d.prompts` (primitives and the 32 strategies),
:mod:`~sap.slice2d.models`, :mod:`~sap.slice2d.sam` (prompted SAM, hybrid refinement),
:mod:`~sap.slice2d.train`, :mod:`~sap.slice2d.predict`, :mod:`~sap.slice2d.bench`,
:mod:`~sap.slice2d.cli` (``sap slice2d train|predict|prompt-bench``).
"""
