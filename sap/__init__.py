"""sap: whole-body MRI/CT bone-lesion segmentation with supervised anatomical pretraining.

Research use only: not a medical device, not for diagnosis.
"""

__version__ = "0.1.0"

RESEARCH_USE_ONLY = "Research use only: not a medical device, not for clinical diagnosis."
