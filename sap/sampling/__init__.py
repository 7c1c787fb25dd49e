"""Patch sampling from memory-mapped cases (SPEC §6, §7).

- :class:`InstanceBalancedSampler`: fine-tuning (one positive patch per lesion instance per epoch).
- :class:`PosNegSampler`: the voxel-uniform ablation (``finetune.sampler: posneg``).
- :class:`ClassBalancedSampler`: skeletal pretraining (a class uniformly, then one of its voxels).

Wrap cases with :class:`SamplingCase` (``SamplingCase.from_cached(load_cached(case, cfg.data))``),
build a sampler, and draw batches with :func:`sap.sampling.torch_data.batch_stream` and an
:class:`EpochCursor` (its ``state_dict`` goes into checkpoints for mid-epoch resume).
"""

from sap.sampling.index import CaseIndex, build_case_index
from sap.sampling.patches import read_patch, start_around, start_bounds
from sap.sampling.samplers import (
    ClassBalancedSampler,
    EpochCursor,
    InstanceBalancedSampler,
    Patch,
    PatchRequest,
    PatchSampler,
    PosNegSampler,
    SamplingCase,
    build_sampler,
    lesion_size_bins,
)

__all__ = [
    "CaseIndex",
    "ClassBalancedSampler",
    "EpochCursor",
    "InstanceBalancedSampler",
    "Patch",
    "PatchRequest",
    "PatchSampler",
    "PosNegSampler",
    "SamplingCase",
    "build_case_index",
    "build_sampler",
    "lesion_size_bins",
    "read_patch",
    "start_around",
    "start_bounds",
]
