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


class PatchBatchDataset(Dataset):
    """Batches of one epoch's requests: item ``i`` is requests ``[i × B, (i + 1) × B)`` read at once.

    Use with ``DataLoader(batch_size=None)``: each patch is copied once, from the memory map into
    the batch array (no per-patch tensors, no collate copy). Items are dicts: ``image`` float32
    ``(B, C, *patch)``, ``label`` uint8 ``(B, 1, *patch)``, ``case`` int64 ``(B,)``, ``positive``
    bool ``(B,)``, ``start`` int64 ``(B, 3)``.
    """

    def __init__(
        self, sampler: PatchSampler, requests: list[PatchRequest], epoch: int, batch_size: int
    ) -> None:
        self.sampler = sampler
        self.requests = requests
        self.epoch = int(epoch)
        self.batch_size = int(batch_size)

    def __len__(self) -> int:
        return -(-len(self.requests) // self.batch_size)

    def __getitem__(self, item: int) -> dict[str, Any]:
        chunk = self.requests[item * self.batch_size : (item + 1) * self.batch_size]
        patches = [self.sampler.resolve(request, self.epoch) for request in chunk]
        images, labels = self.sampler.read_batch(patches)
        return {
            "image": torch.from_numpy(images),
            "label": torch.from_numpy(labels)[:, None],
            "case": torch.tensor([p.request.case for p in patches], dtype=torch.int64),
            "positive": torch.tensor([p.request.kind == "pos" for p in patches]),
            "start": torch.from_numpy(np.stack([p.start for p in patches]).astype(np.int64)),
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
        loader = DataLoader(
            PatchBatchDataset(sampler, requests, cursor.epoch, sampler.batch_size),
            batch_size=None,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=pin_memory,
        )
        for batch in loader:
            cursor.advance(len(batch["case"]))
            yield batch
