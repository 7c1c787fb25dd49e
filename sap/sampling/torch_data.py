"""torch side of the samplers: a map-style dataset over one epoch's requests and a resumable batch stream.

The samplers themselves are numpy-only; this module turns their requests into batches through a
``torch.utils.data.DataLoader`` (worker processes read patches from the memory-mapped cache in
parallel). Each request carries its own seed, so results do not depend on ``num_workers``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sap.sampling.samplers import EpochCursor, PatchRequest, PatchSampler


class PatchDataset(Dataset):
    """Patches of a list of requests of one epoch.

    Items are dicts: ``image`` float32 tensor ``(C, *patch)``, ``label`` uint8 tensor ``(1, *patch)``,
    ``case`` (int), ``kind`` ("pos"/"neg"/"cls"), ``start`` (int64 tensor ``(3,)``).
    """

    def __init__(self, sampler: PatchSampler, requests: list[PatchRequest], epoch: int) -> None:
        self.sampler = sampler
        self.requests = requests
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, item: int) -> dict[str, Any]:
        patch = self.sampler.resolve(self.requests[item], self.epoch)
        image, label = self.sampler.read(patch)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "label": torch.from_numpy(np.ascontiguousarray(label))[None],
            "case": patch.request.case,
            "kind": patch.request.kind,
            "start": torch.from_numpy(patch.start.astype(np.int64)),
        }


def batch_stream(
    sampler: PatchSampler,
    cursor: EpochCursor,
    rank: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[dict[str, Any]]:
    """Endless batches of ``sampler.batch_size`` patches for ``rank``, epoch after epoch.

    ``cursor`` is advanced *before* a batch is handed out, so a checkpoint written after training on
    the batch resumes with the next one. Stop iterating whenever training ends.
    """
    while True:
        requests = cursor.remaining(sampler, rank)
        epoch = cursor.epoch
        loader = DataLoader(
            PatchDataset(sampler, requests, epoch),
            batch_size=sampler.batch_size,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=False,
        )
        for batch in loader:
            cursor.advance(len(batch["case"]))
            yield batch
